"""kvcli/flash.py on the CPU: when flash-attn is used and which kernel each call gets, and, with
flash-attn's kernels faked from their documented semantics, the same output as kvcli's SDPA path."""

from __future__ import annotations

import math

import pytest
import torch

from kvcli import flash
from kvcli.attention import LayerAttention, attend

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16


def reference_flash(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash-attn's documented forward, written out: q `(b, seqlen_q, nheads, d)`, k/v `(b, seqlen_k,
    nheads_k, d)`; query head h reads KV head h // (nheads / nheads_k); causal is bottom-right
    aligned; query i sees keys in [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]."""
    _, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(d)
    out = torch.zeros(q.shape, dtype=torch.float64)
    left, right = window_size
    for h in range(nheads):
        kv = h // (nheads // nheads_k)
        for i in range(seqlen_q):
            diagonal = i + seqlen_k - seqlen_q
            logits = []
            for j in range(seqlen_k):
                if causal and j > diagonal:
                    continue
                if left >= 0 and j < diagonal - left:
                    continue
                if right >= 0 and j > diagonal + right:
                    continue
                logit = float(q[0, i, h].double() @ k[0, j, kv].double()) * scale
                if softcap > 0:
                    logit = softcap * math.tanh(logit / softcap)
                logits.append((j, logit))
            top = max(logit for _, logit in logits)
            weights = [(j, math.exp(logit - top)) for j, logit in logits]
            total = sum(w for _, w in weights)
            out[0, i, h] = sum(w / total * v[0, j, kv].double() for j, w in weights)
    return out.to(q.dtype)


class FakeKernels:
    """flash-attn's two kernels, faked by `reference_flash`, recording which was called with what."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def func(self, q, k, v, **options):
        self.calls.append(("func", options))
        return reference_flash(q, k, v, **options)

    def kvcache(self, q, k_cache, v_cache, **options):
        self.calls.append(("kvcache", options))
        return reference_flash(q, k_cache, v_cache, **options)


@pytest.fixture
def fake_flash(monkeypatch):
    """flash-attn 'installed' and the CPU treated as a capable GPU; float32 allowed so the comparison is exact."""
    kernels = FakeKernels()
    monkeypatch.setattr(flash, "_kernels", lambda: (kernels.func, kernels.kvcache))
    monkeypatch.setattr(flash, "installed", lambda: None)
    monkeypatch.setattr(flash, "_device_reason", lambda tensor: None)
    monkeypatch.setattr(flash, "DTYPES", frozenset({torch.float32, torch.float16, torch.bfloat16}))
    monkeypatch.delenv("KVCLI_FLASH", raising=False)
    return kernels


def tensors(q_len: int, k_len: int, dtype=torch.float32, head_dim: int = HEAD_DIM, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, NUM_HEADS, q_len, head_dim, generator=gen, dtype=torch.float32).to(dtype)
    # keys and values as the cache stores them: a (1, num_kv_heads, capacity, head_dim) buffer, viewed up to its length
    buffer = torch.randn(2, 1, NUM_KV_HEADS, k_len + 5, head_dim, generator=gen, dtype=torch.float32).to(dtype)
    return query, buffer[0][:, :, :k_len], buffer[1][:, :, :k_len]


CASES = {
    "prefill": (24, 24, LayerAttention(scaling=HEAD_DIM**-0.5)),
    "chunk after a cache": (6, 30, LayerAttention(scaling=HEAD_DIM**-0.5)),
    "decode": (1, 30, LayerAttention(scaling=0.3)),
    "sliding window, prefill": (20, 20, LayerAttention(scaling=HEAD_DIM**-0.5, sliding_window=5)),
    "sliding window, decode": (1, 12, LayerAttention(scaling=HEAD_DIM**-0.5, sliding_window=8)),
    "softcap, chunk": (5, 18, LayerAttention(scaling=HEAD_DIM**-0.5, softcap=2.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flash_path_equals_the_sdpa_path(fake_flash, case):
    """With flash-attn's kernels faked from their documented semantics, flash.attend returns what kvcli's SDPA attend returns (causal alignment, window, softcap, scale and grouped heads all mapped right)."""
    q_len, k_len, attn = CASES[case]
    query, key, value = tensors(q_len, k_len)
    got = flash.attend(query, key, value, attn)
    want = attend(query, key, value, attn)
    assert got is not None and got.shape == want.shape == (1, q_len, NUM_HEADS, HEAD_DIM)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_the_fake_kernel_differs_from_sdpa_when_the_window_is_off_by_one(fake_flash):
    """The comparison above can fail: a window one key too wide gives another output than kvcli's attention."""
    query, key, value = tensors(10, 10)
    attn = LayerAttention(scaling=HEAD_DIM**-0.5, sliding_window=4)
    wrong = reference_flash(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=attn.scaling, causal=True, window_size=(4, 0))
    assert not torch.allclose(wrong, attend(query, key, value, attn), atol=1e-3)


def test_each_step_gets_its_kernel(fake_flash):
    """Decoding one token calls flash_attn_with_kvcache; prefill and multi-token steps call flash_attn_func, causal; the window and softcap are passed as flash-attn reads them."""
    cases = [
        ((1, 40), LayerAttention(scaling=0.25), ("kvcache", (-1, -1), 0.0)),
        ((40, 40), LayerAttention(scaling=0.25), ("func", (-1, -1), 0.0)),
        ((7, 40), LayerAttention(scaling=0.25, sliding_window=16, softcap=50.0), ("func", (15, 0), 50.0)),
        ((7, 12), LayerAttention(scaling=0.25, sliding_window=16), ("func", (-1, -1), 0.0)),  # the window hides nothing yet
    ]
    for (q_len, k_len), attn, (kernel, window, softcap) in cases:
        call = flash.plan_call(*tensors(q_len, k_len), attn)
        assert (call.kernel, call.window_size, call.softcap, call.causal, call.softmax_scale) == (kernel, window, softcap, True, 0.25)


@pytest.mark.parametrize("reason, change", [
    ("not CUDA", {"device": "cpu"}),
    ("fp16 or bf16", {"dtype": torch.float32}),
    ("not installed", {"installed": "flash-attn is not installed"}),
    ("attention sinks", {"sinks": True}),
    ("head dims up to 256", {"head_dim": 512}),
    ("turned off", {"env": "0"}),
])
def test_sdpa_is_used_where_flash_cannot_run(monkeypatch, reason, change):
    """flash.attend returns None (the caller uses SDPA) off CUDA, in float32, without flash-attn, with attention sinks, past head dim 256, or when KVCLI_FLASH=0; and says why."""
    kernels = FakeKernels()
    monkeypatch.setattr(flash, "_kernels", lambda: (kernels.func, kernels.kvcache))
    monkeypatch.setattr(flash, "installed", lambda: change.get("installed"))
    if change.get("device") != "cpu":
        monkeypatch.setattr(flash, "_device_reason", lambda tensor: None)
    if "env" in change:
        monkeypatch.setenv("KVCLI_FLASH", change["env"])
    else:
        monkeypatch.delenv("KVCLI_FLASH", raising=False)
    query, key, value = tensors(8, 8, dtype=change.get("dtype", torch.bfloat16), head_dim=change.get("head_dim", HEAD_DIM))
    attn = LayerAttention(scaling=0.25, sinks=torch.zeros(NUM_HEADS) if change.get("sinks") else None)
    assert reason in flash.why_not(query, key, value, attn)
    assert flash.attend(query, key, value, attn) is None and kernels.calls == []


def test_bf16_on_a_capable_gpu_uses_flash(monkeypatch):
    """The same bf16 call that the refusals above start from does go to flash-attn when nothing forbids it."""
    kernels = FakeKernels()
    monkeypatch.setattr(flash, "_kernels", lambda: (kernels.func, kernels.kvcache))
    monkeypatch.setattr(flash, "installed", lambda: None)
    monkeypatch.setattr(flash, "_device_reason", lambda tensor: None)
    monkeypatch.delenv("KVCLI_FLASH", raising=False)
    query, key, value = tensors(8, 8, dtype=torch.bfloat16)
    assert flash.why_not(query, key, value, LayerAttention(scaling=0.25)) is None
    assert flash.attend(query, key, value, LayerAttention(scaling=0.25)) is not None and [name for name, _ in kernels.calls] == ["func"]


def test_use_flash_false_forbids_it_inside_only(fake_flash):
    """use_flash(False) sends the calls made inside to SDPA and restores flash-attn after."""
    query, key, value = tensors(4, 4)
    attn = LayerAttention(scaling=0.25)
    with flash.use_flash(False):
        assert flash.attend(query, key, value, attn) is None
    assert flash.attend(query, key, value, attn) is not None


def test_versions_are_compared_as_numbers(monkeypatch):
    """A flash-attn older than 2.6 (no softcap) is refused; 2.10 is newer than 2.6."""
    assert flash._version("2.10.1") > flash._version("2.6.0") > flash._version("2.5.9.post1")
    assert flash._version("2.7.4.post1") >= flash.MIN_VERSION


def test_the_cpu_is_not_a_flash_device():
    """Without patches, a CPU tensor is never sent to flash-attn, whatever is installed."""
    query, key, value = tensors(4, 4, dtype=torch.bfloat16)
    assert "not CUDA" in flash.why_not(query, key, value, LayerAttention(scaling=0.25))
