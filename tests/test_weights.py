"""int8 weights on CPU (`--dtype int8`, `auto` on CPUs with bfloat16 instructions): the products,
the tables, the saved checkpoint, the load, the report, and the embedded model's answers."""

from __future__ import annotations

import json

import pytest
import torch
from test_models import save_tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from kvcli.cli import app
from kvcli.models import int8_kernel, load_model
from kvcli.models.identity import weights_fingerprint
from kvcli.models.weights import (
    INT8_ROWS,
    cast_floats,
    Int8Embedding,
    Int8Linear,
    load_quantized,
    mlp_in_blocks,
    quantize_model,
    quantize_rows,
    save_quantized,
    saved_fingerprint,
)

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def test_rows_round_to_half_a_step_of_their_own_scale():
    """Each weight moves by at most half its row's step (the row's largest magnitude / 127), and an all-zero row stays zero."""
    weight = torch.randn(48, 96) * torch.rand(48, 1) * 3
    weight[5] = 0
    qweight, scale = quantize_rows(weight)
    assert qweight.dtype == torch.int8 and scale.dtype == torch.bfloat16
    error = (qweight.float() * scale.float()[:, None] - weight).abs()
    assert (error <= scale.float()[:, None] / 2 + 1e-6).all()
    assert (qweight[5] == 0).all()
    assert (weight.abs().amax(1)[:, None] / scale.float()[:, None] <= 127.5).all()


@pytest.mark.parametrize("rows", [1, INT8_ROWS, INT8_ROWS + 1, 200])
def test_int8_products_equal_the_rounded_weights_products(rows):
    """Through the int8 kernel (few rows) or widened to bfloat16 (many), a product is the rounded weight's, within bfloat16's rounding, and near the float one."""
    torch.manual_seed(1)
    linear = nn.Linear(256, 96, bias=True)
    inputs = torch.randn(1, rows, 256)
    module = Int8Linear.of(linear)
    out = module(inputs)
    assert out.shape == (1, rows, 96) and out.dtype == torch.float32
    exact = inputs @ module.dequantized().float().T + linear.bias  # the rounded weight, in float32
    assert torch.allclose(out, exact, rtol=2e-2, atol=2e-2 * exact.abs().mean().item())
    reference = linear(inputs)
    assert (out - reference).norm() / reference.norm() < 0.02


def test_both_products_give_a_row_the_same_numbers():
    """A row computed with the decode kernel and with the prefill product differ only by bfloat16 rounding."""
    torch.manual_seed(2)
    module = Int8Linear.of(nn.Linear(128, 64, bias=False))
    rows = torch.randn(INT8_ROWS + 4, 128)
    many = module(rows)  # widened to bfloat16
    few = torch.cat([module(rows[i : i + 1]) for i in range(rows.shape[0])])  # the int8 kernel
    assert torch.allclose(many, few, rtol=2e-2, atol=1e-2 * many.abs().mean().item())


@pytest.mark.parametrize("tied", [True, False])
def test_every_linear_goes_int8_and_a_tied_embedding_shares_the_head_table(tied):
    """quantize_model leaves no nn.Linear; a tied embedding reads the head's int8 table (the same storage), an untied one has its own; looked-up rows are the rounded rows."""
    model = tiny(tied)
    table = model.get_input_embeddings().weight.detach().clone()
    replaced = quantize_model(model)
    assert replaced == 2 * 7 + 1 and not any(type(m) is nn.Linear for m in model.modules())
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, Int8Embedding)
    head = model.get_output_embeddings()
    assert (embedding.weight.data_ptr() == head.qweight.data_ptr()) == tied
    ids = torch.tensor([[0, 5, 63]])
    looked_up = embedding(ids)
    qweight, scale = quantize_rows(table)
    assert torch.allclose(looked_up[0], (qweight[ids[0]].float() * scale[ids[0]].float()[:, None]), atol=1e-2)
    names = set(model.state_dict())
    assert ("model.embed_tokens.qweight" in names) != tied and "lm_head.qweight" in names


def test_mlps_fed_in_blocks_compute_the_same_numbers():
    """An MLP that takes its tokens a few at a time returns what it returns for all at once (to float32's last bits: BLAS sums blocks in another order)."""
    model = tiny(False)
    ids = torch.randint(0, 64, (1, 23), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = model(ids).logits
        assert mlp_in_blocks(model, rows=4) == 2
        blocked = model(ids).logits
    assert torch.allclose(whole, blocked, rtol=1e-5, atol=1e-6)


def test_int8_mlps_fed_in_blocks_widen_each_weight_once_and_free_it():
    """An int8 MLP read in blocks widens each weight once for all its blocks, not once per block,
    and holds no widened weight afterwards (the numbers: the test above)."""
    model = tiny(False)
    quantize_model(model)
    cast_floats(model, torch.bfloat16)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(4))
    widened = []
    original = Int8Linear.dequantized
    with torch.inference_mode():
        whole = model(ids).logits
        mlp_in_blocks(model, rows=17)  # blocks above INT8_ROWS: every block widens
        try:
            Int8Linear.dequantized = lambda self: widened.append(self) or original(self)
            blocked = model(ids).logits
        finally:
            Int8Linear.dequantized = original
    mlp_layers = [layer for name, layer in model.named_modules() if ".mlp." in name and isinstance(layer, Int8Linear)]
    assert sorted(map(id, (w for w in widened if w in mlp_layers))) == sorted(map(id, mlp_layers))  # once each, not per block
    assert all(layer.widened is None for layer in model.modules() if isinstance(layer, Int8Linear))
    assert torch.isfinite(blocked).all() and blocked.shape == whole.shape


@pytest.mark.parametrize("tied", [True, False])
def test_a_saved_int8_checkpoint_loads_as_it_was_saved(tmp_path, tied):
    """save_quantized then load_quantized gives the same tensors and logits, holds no float linear weight, and keeps the float weights' fingerprint."""
    model = tiny(tied)
    fingerprint = weights_fingerprint(model)
    quantize_model(model)
    save_quantized(model, tmp_path / "saved", fingerprint)
    loaded = load_quantized(tmp_path / "saved", torch.float32)
    assert saved_fingerprint(tmp_path / "saved") == fingerprint
    assert not any(type(m) is nn.Linear for m in loaded.modules())
    assert (loaded.get_input_embeddings().weight.data_ptr() == loaded.get_output_embeddings().qweight.data_ptr()) == tied
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.model.rotary_emb.inv_freq.device.type == "cpu"  # computed, not left on the meta device
    # read into torch's own (aligned) memory: the int8 kernel crashed on a mapped file's weights
    assert all(t.data_ptr() % 64 == 0 for t in got.values() if t.dtype == torch.int8)


def test_a_folder_loads_with_int8_weights_under_bfloat16(tmp_path, home):
    """`--dtype int8` on a checkpoint folder: int8 linear layers, bfloat16 elsewhere, the float load's fingerprint, logits near the float load's."""
    folder = save_tiny_llama(tmp_path / "tiny_llama")
    float_lm = load_model(str(folder), device="cpu", dtype="float32")
    int8_lm = load_model(str(folder), device="cpu", dtype="int8")
    assert (int8_lm.weights, int8_lm.dtype, int8_lm.precision) == ("int8", torch.bfloat16, "int8 weights, bfloat16")
    assert float_lm.weights is None and float_lm.precision == "float32"
    assert not any(type(m) is nn.Linear for m in int8_lm.model.modules())
    assert all(p.dtype in (torch.int8, torch.bfloat16) for p in int8_lm.model.parameters())
    assert int8_lm.weights_fingerprint == float_lm.weights_fingerprint
    ids = torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = float_lm.model(ids).logits
        got = int8_lm.model(ids).logits.float()
    assert (got - expected).norm() / expected.norm() < 0.05


def test_the_report_and_json_name_the_weights_and_the_dtype(tmp_path, home):
    """`ask --json` says the dtype the model computed in and how its weights were stored; the report's model line says both."""
    folder = save_tiny_llama(tmp_path / "tiny_llama")
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{i % 60}" for i in range(80)))
    result = runner.invoke(app, ["ask", str(doc), "w1 w2", "-m", str(folder), "--dtype", "int8", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    kernel = int8_kernel.name()  # kvcli's where it builds and runs (tests/test_int8_kernel.py), else torch's
    assert (stats["dtype"], stats["weights"], stats["int8_kernel"]) == ("bfloat16", "int8", kernel)
    plain = runner.invoke(app, ["ask", str(doc), "w1 w2", "-m", str(folder), "--dtype", "float32", "--max-new-tokens", "3", "--json"])
    assert plain.exit_code == 0 and json.loads(plain.stdout)["stats"]["int8_kernel"] == ""
    plain = runner.invoke(app, ["ask", str(doc), "w1 w2", "-m", str(folder), "--dtype", "float32", "--max-new-tokens", "3"])
    assert plain.exit_code == 0 and "(float32)" in plain.stderr
    report = runner.invoke(app, ["ask", str(doc), "w1 w2", "-m", str(folder), "--dtype", "int8", "--max-new-tokens", "3"])
    assert report.exit_code == 0 and f"(int8 weights ({kernel} kernel), bfloat16)" in report.stderr


@pytest.mark.model
def test_the_default_model_answers_the_same_with_int8_weights(qwen, qwen_float32):
    """On the default model, int8 weights (bfloat16 compute) answer planted facts as float32 weights do, greedy, token for token over the answer's first words."""
    from helpers_text import prose, with_needle

    from kvcli.methods import make_method
    from kvcli.reading import Options, answer
    from kvcli.reading.policy import choose

    if qwen.lm.weights != "int8":
        pytest.skip("this CPU has no bfloat16 instructions: auto loads float32 weights here")
    float_reader = qwen_float32
    facts = [
        ("The combination of the harbour office safe is 4-7-2-9.", "What is the combination of the harbour office safe?"),
        ("The lighthouse keeper's cat is named Admiral Pickles.", "What is the lighthouse keeper's cat named?"),
        ("The spare key to the archive room is hidden under the blue flowerpot.", "Where is the spare key to the archive room hidden?"),
    ]
    options = Options(max_new_tokens=12)
    for index, (fact, question) in enumerate(facts):
        text = with_needle(prose(qwen.tokenizer, 2000, start_topic="exceptions"), fact, 0.3 + 0.2 * index)
        answers = []
        for reader in (qwen, float_reader):
            method = make_method("evidencekv")
            reading = choose(reader, text, options, method, [question]).read(question, method)
            answers.append(answer(reader, reading, options).text)
        assert answers[0] == answers[1], (question, answers)


@pytest.mark.parametrize("name", __import__("test_architectures").ARCHITECTURES)
def test_every_architecture_runs_with_int8_weights(name):
    """Each tested architecture, quantized as `--dtype int8` loads it (int8 linears and tables, bfloat16 elsewhere, MLPs in blocks), prefills and decodes through kvcli, its first-token logits near the float model's."""
    import copy

    from test_architectures import models, prompt

    from kvcli.generate import decode, prefill

    reference, _ = models(name)
    model = copy.deepcopy(reference)
    quantize_model(model)
    cast_floats(model, torch.bfloat16)
    mlp_in_blocks(model, rows=7)
    assert not any(type(m) is nn.Linear for m in model.modules())
    ids = prompt()
    with torch.inference_mode():
        expected = reference(ids).logits[0, -1]
    state = prefill(model, ids)
    # random tiny models amplify rounding layer by layer (bfloat16 alone moved phi3's logits by 0.08,
    # int8 by 0.18); a wrong scale or a mangled table moves them by about 1
    assert (state.logits.float() - expected).norm() / expected.norm() < 0.25
    assert len(list(decode(model, state, 4, set()))) == 4


@pytest.mark.parametrize("in_features", [24, 72, 100])
@pytest.mark.parametrize("rows", [1, 2, INT8_ROWS])
def test_widths_the_int8_kernel_mishandles_take_the_widened_product(in_features, rows):
    """A layer whose input width is no multiple of 16 (torch's int8 kernel gave wrong numbers and crashed there) still computes the rounded weight's product, as does a strided input."""
    torch.manual_seed(6)
    module = Int8Linear.of(nn.Linear(in_features, 40, bias=False))
    inputs = torch.randn(rows, in_features)
    exact = inputs @ module.dequantized().float().T
    assert torch.allclose(module(inputs), exact, rtol=2e-2, atol=2e-2 * exact.abs().mean().item())
    wide = Int8Linear.of(nn.Linear(64, 40, bias=False))
    strided = torch.randn(1, 64, rows).transpose(1, 2)  # (1, rows, 64), its last dimension not contiguous
    expected = strided @ wide.dequantized().float().T
    assert torch.allclose(wide(strided), expected, rtol=2e-2, atol=2e-2 * expected.abs().mean().item())


def test_a_device_map_keeps_float_weights():
    """With --device-map, `int8` is refused in one line and `auto` on a CPU is float32 (the map places float weights), with no int8."""
    from kvcli.errors import ModelError
    from kvcli.models import resolve_precision

    with pytest.raises(ModelError, match="--device-map"):
        resolve_precision("int8", "cpu", "auto")
    assert resolve_precision("auto", "cpu", "auto") == (torch.float32, None)
    assert resolve_precision("bfloat16", "cpu", "auto") == (torch.bfloat16, None)


@pytest.mark.parametrize("blocked", [False, True])
def test_an_int8_head_read_in_vocabulary_slices_gives_the_surprisal_of_its_whole_logits(blocked, monkeypatch):
    """token_surprisal reads an int8 output layer a slice of rows at a time (`widened_rows`, from the
    blocked layout too), never widening the whole weight, and gives each token the cross-entropy of the
    head's own logits, as calling the head whole does; each slice is the same rows of the widened weight."""
    from kvcli.generate import prefill, prepare_model
    from kvcli.repeat import _decoder_outputs, token_surprisal

    model = tiny(True)
    quantize_model(model)
    cast_floats(model, torch.bfloat16)
    head = model.get_output_embeddings()
    if blocked and not head.block_for_decode():
        pytest.skip("kvcli's int8 kernel does not block this shape on this CPU")
    torch.testing.assert_close(head.widened_rows(9, 40), head.dequantized()[9:40], rtol=0, atol=0)
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(5))
    prepare_model(model)
    with _decoder_outputs(model) as seen:
        prefill(model, ids)
    whole = Int8Linear.dequantized
    monkeypatch.setattr(Int8Linear, "dequantized", lambda self: pytest.fail("widened the whole weight"))
    sliced = token_surprisal(model, ids, seen[0], block=4, vocab_rows=24)  # 64 rows: 24 + 24 + 16
    monkeypatch.setattr(Int8Linear, "dequantized", whole)
    with torch.inference_mode():
        logits = head(seen[0][0]).float()
    expected = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(sliced[1:], expected, rtol=1e-3, atol=1e-3)
