"""kvcli's decode attention kernel for packed layers (kvcli/decode_kernel.py, kvcli/attend_rows.c):
the same attention as SDPA over each KV head's own entries, in one call, and SDPA wherever it cannot run."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kvcli import decode_kernel
from kvcli.attention import LayerAttention, attend_heads, attend_packed
from kvcli.cache import KVLayer
from kvcli.generate import decode, prefill
from kvcli.methods import make_method, plan_budget
from methodutil import squeeze

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernel = pytest.mark.skipif(decode_kernel.name() != decode_kernel.KVCLI,
                                  reason=f"kvcli's decode attention kernel does not run here: {decode_kernel.why_not()}")


def pooled_layer(lengths: list[int], head_dim: int, dtype=torch.bfloat16, seed: int = 0) -> KVLayer:
    """A packed layer whose heads hold `lengths` entries, then one decode step's append (which pools it)."""
    gen = torch.Generator().manual_seed(seed)
    layer = KVLayer()
    layer.load_heads([(2 * torch.randn(1, 1, n - 1, head_dim, generator=gen)).to(dtype) for n in lengths],
                     [torch.randn(1, 1, n - 1, head_dim, generator=gen).to(dtype) for n in lengths],
                     [torch.arange(n - 1) for n in lengths])
    new = torch.randn(1, len(lengths), 1, head_dim, generator=gen).to(dtype)
    layer.append(2 * new, new.flip(1), torch.tensor([10_000]))
    return layer


def exact(query: torch.Tensor, layer: KVLayer, scaling: float) -> torch.Tensor:
    """The attention in float32 over each head's own (bf16) entries: `(1, 1, num_heads, v_dim)`."""
    heads = layer.head_views()
    group = query.shape[1] // len(heads)
    outs = [F.scaled_dot_product_attention(query[:, h * group : (h + 1) * group].float().transpose(1, 2), keys.float(), values.float(), scale=scaling)
            for h, (keys, values) in enumerate(heads)]  # (1, 1, group, v_dim) each
    return torch.cat(outs, dim=2)


@needs_kernel
@pytest.mark.parametrize("lengths,group,head_dim,threads", [
    ([92, 368], 7, 64, 1),  # the default model's shape, heads as the adaptive split leaves them
    ([1, 15, 16], 3, 64, 1),  # SmolLM2's; a head of one entry, one short of a block, one block
    ([17, 33], 4, 128, 1),  # blocks and pairs of keys cut short
    ([40, 2, 300, 77, 5, 129, 64, 900], 4, 128, 1),  # eight KV heads of an 8B model
    ([6000, 3000], 4, 128, 2),  # two threads: each a share of every KV head's rows, merged
    ([92, 368], 7, 64, 2),
    ([100, 900, 400], 3, 64, 2),
    ([500, 3000, 200, 700], 1, 64, 2),  # one query head per KV head: each read by key rows
    ([33, 700], 2, 64, 2),
    ([1, 15, 6000], 3, 64, 2),  # heads of one block: one thread's share of them empty
])
def test_the_kernel_attends_a_pooled_layer_as_exactly_as_sdpa(lengths, group, head_dim, threads):
    """On a pooled bfloat16 layer `attend_packed` runs the kernel (one call), and its output is as
    close to the float32 attention over each head's own entries as SDPA per head in bfloat16 is."""
    layer = pooled_layer(lengths, head_dim)
    assert layer.packed and layer.head_lengths() == lengths
    query = torch.randn(1, group * len(lengths), 1, head_dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    attn = LayerAttention(scaling=head_dim**-0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = layer.pooled_rows()
        assert rows is not None
        kernel = decode_kernel.attend_pool(query, *rows, attn.scaling)
        assert kernel is not None
        assert torch.equal(attend_packed(query, layer, attn), kernel)
    finally:
        torch.set_num_threads(previous)
    sdpa = attend_heads(query, layer.head_views(), attn)
    reference = exact(query, layer, attn.scaling)
    assert kernel.shape == sdpa.shape == (1, 1, group * len(lengths), head_dim) and kernel.dtype == torch.bfloat16
    kernel_error = (kernel.float() - reference).abs().max().item()
    sdpa_error = (sdpa.float() - reference).abs().max().item()
    assert kernel_error <= 2 * sdpa_error + 1e-3, (kernel_error, sdpa_error)
    # every query head attends its own KV head: each head's rows, not its neighbour's
    assert (kernel.float() - reference).abs().mean().item() < 5e-3


@needs_kernel
def test_a_nan_in_an_entry_is_a_nan_in_its_heads_output():
    layer = pooled_layer([20, 40], 64)
    keys, _, starts, _ = layer.pooled_rows()
    keys[0, 0, starts[1] + 3, 0] = float("nan")
    query = torch.randn(1, 4, 1, 64).to(torch.bfloat16)
    out = attend_packed(query, layer, LayerAttention(scaling=0.125))
    assert not out[0, 0, :2].isnan().any() and out[0, 0, 2:].isnan().all()


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 48)])
def test_what_the_kernel_does_not_take_is_attended_by_sdpa(dtype, head_dim):
    """A float32 cache or a head dim that is not a multiple of 32: SDPA per head, as before."""
    layer = pooled_layer([10, 30], head_dim, dtype)
    query = torch.randn(1, 4, 1, head_dim).to(dtype)
    attn = LayerAttention(scaling=head_dim**-0.5)
    assert decode_kernel.attend_pool(query, *layer.pooled_rows(), attn.scaling) is None
    assert torch.equal(attend_packed(query, layer, attn), attend_heads(query, layer.head_views(), attn))


def test_a_layer_whose_heads_left_the_pool_is_read_head_by_head():
    """After a per-head keep the heads hold buffers of their own: no pool rows, SDPA per head."""
    layer = pooled_layer([10, 30], 64)
    layer.keep_positions([torch.tensor([0, 3, 8]), torch.tensor([1, 2, 5, 8, 28])])
    assert layer.pooled_rows() is None
    query = torch.randn(1, 4, 1, 64).to(torch.bfloat16)
    attn = LayerAttention(scaling=0.125)
    assert torch.equal(attend_packed(query, layer, attn), attend_heads(query, layer.head_views(), attn))


def bf16_llama() -> LlamaForCausalLM:
    """A random grouped-query Llama in bfloat16 with head dim 32 (what the kernel takes)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, initializer_range=0.3, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval().to(torch.bfloat16)


@needs_kernel
def test_a_model_decodes_packed_layers_with_the_kernel_as_with_sdpa(monkeypatch):
    """Greedy decoding after an adaptive split: the kernel attends every packed layer's steps, and
    the tokens are those SDPA per head gives."""
    model = bf16_llama()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(1))
    method = make_method("snapkv", head_split="adaptive")
    compression = squeeze(method, plan_budget(96, 4, window_size=method.window_size, ratio=0.25))
    calls = []
    attend_pool = decode_kernel.attend_pool

    def counted(*args):
        out = attend_pool(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(decode_kernel, "attend_pool", counted)
    state = prefill(model, ids, compression)
    packed = sum(layer.packed for layer in state.cache.layers)
    assert packed, "the adaptive split should leave some heads unequal on random weights"
    with_kernel = list(decode(model, state, 12, set()))
    assert len(calls) == packed * 11 and all(calls)  # every step after the first token's, every packed layer
    monkeypatch.setattr(decode_kernel, "_kernel", lambda: (None, "test"))
    assert list(decode(model, prefill(model, ids, compression), 12, set())) == with_kernel


def test_sdpa_can_be_chosen(monkeypatch):
    monkeypatch.setenv("KVCLI_ATTENTION_KERNEL", "sdpa")
    decode_kernel._kernel.cache_clear()
    try:
        assert decode_kernel.name() == decode_kernel.SDPA
        assert decode_kernel.why_not() == "KVCLI_ATTENTION_KERNEL=sdpa"
    finally:
        decode_kernel._kernel.cache_clear()


def test_a_failed_build_falls_back_to_sdpa_and_says_why(tmp_path, monkeypatch):
    """A compiler that fails (or none, or a CPU without the instructions): SDPA, and the reason in one line."""
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\necho 'error: no such thing' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    os.makedirs(tmp_path / "tmp")
    decode_kernel._kernel.cache_clear()
    try:
        assert decode_kernel.name() == decode_kernel.SDPA
        why = decode_kernel.why_not()
        assert "\n" not in why and why
        if "could not build" in why:  # on a CPU with the instructions: the compiler's own line
            assert why == "cc could not build attend_rows.c: error: no such thing"
        layer = pooled_layer([10, 30], 64)
        query = torch.randn(1, 4, 1, 64).to(torch.bfloat16)
        attn = LayerAttention(scaling=0.125)
        assert torch.equal(attend_packed(query, layer, attn), attend_heads(query, layer.head_views(), attn))
    finally:
        decode_kernel._kernel.cache_clear()


@needs_kernel
def test_the_wrapper_refuses_what_does_not_fit_its_rows():
    """Shapes the kernel would misread are refused (None: SDPA), never read past the tensors."""
    layer = pooled_layer([10, 30], 64)
    keys, values, starts, lengths = layer.pooled_rows()
    query = torch.randn(1, 4, 1, 64).to(torch.bfloat16)
    assert decode_kernel.attend_pool(query, keys, values, starts, lengths, 0.125) is not None
    two_steps = torch.randn(1, 4, 2, 64).to(torch.bfloat16)
    for bad in [(two_steps, keys, values, starts, lengths),  # a question's prefill, not one step
                (torch.randn(2, 4, 1, 64).to(torch.bfloat16), keys, values, starts, lengths),  # a batch
                (query, keys[..., :32], values, starts, lengths),  # keys narrower than the query
                (query, keys, values, starts, [lengths[0], keys.shape[2]]),  # a head past the buffer's rows
                (query, keys, values, starts[:1], lengths),  # a start missing
                (query, keys, values, [], []),  # no heads
                (query, keys.expand(1, 2, -1, -1), values, starts, lengths)]:  # two heads' buffer
        assert decode_kernel.attend_pool(*bad, 0.125) is None


@needs_kernel
def test_a_key_far_below_the_best_gets_no_weight():
    """A logit 200 below the row's largest (or -inf) weighs 0, as in SDPA, not e^-87."""
    layer = pooled_layer([4, 9], 64, seed=2)
    keys, values, starts, lengths = layer.pooled_rows()
    query = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16)
    query[..., 0] = 1.0  # each logit is its key's first element
    keys[0, 0, starts[0] : starts[0] + 4, 0] = torch.tensor([0.0, 0.0, 0.0, -200.0])
    keys[0, 0, starts[1] : starts[1] + 9, 0] = torch.tensor([0.0] * 8 + [float("-inf")])
    values[0, 0, starts[0] + 3] = 3e38
    values[0, 0, starts[1] + 8] = 1e38
    out = decode_kernel.attend_pool(query, keys, values, starts, lengths, 1.0)
    assert out is not None
    # e^-87 x 3e38 would add ~5 to every output of the first KV head's query heads
    assert (out.float() - exact(query, layer, 1.0)).abs().max().item() < 0.05


def test_a_temporary_folder_others_can_write_is_never_used(tmp_path, monkeypatch):
    """Where KVCLI_HOME cannot hold kernels, the temporary folder is used only if it is this user's
    alone: a library planted in a folder others can write is never loaded."""
    from kvcli import native

    home = tmp_path / "home"
    home.write_text("a file, not a folder")
    monkeypatch.setenv("KVCLI_HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    shared = tmp_path / "tmp" / f"kvcli-kernels-{os.getuid()}"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    if native.x86_linux(*decode_kernel.CPU) or native.compiler() is None:
        pytest.skip("no kernel builds here")
    library, why = native.load(decode_kernel.SOURCE, decode_kernel.FLAGS, decode_kernel.CPU)
    assert library is None and why == "no writable folder for the built kernel (KVCLI_HOME or the temporary folder)"
    assert list(shared.iterdir()) == []
    shared.chmod(0o700)
    library, why = native.load(decode_kernel.SOURCE, decode_kernel.FLAGS, decode_kernel.CPU)
    assert library is not None and why == "" and [p.suffix for p in shared.iterdir()] == [".so"]


@needs_kernel
def test_a_nan_in_one_threads_share_reaches_the_output():
    """Two threads share each head's rows: a NaN in the share of one thread (its only row) is NaN in
    that head's outputs, as on one thread, not dropped when the shares merge."""
    layer = pooled_layer([17] * 15 + [18], 64)  # 16 KV heads of 4 query heads: 69K products, two threads
    keys, _, starts, _ = layer.pooled_rows()
    keys[0, 0, starts[0] + 16, 5] = float("nan")  # the last row of head 0: the second thread's share
    query = torch.randn(1, 64, 1, 64).to(torch.bfloat16)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = attend_packed(query, layer, LayerAttention(scaling=0.125))
            assert out[0, 0, :4].isnan().all() and not out[0, 0, 4:].isnan().any()
    finally:
        torch.set_num_threads(previous)
