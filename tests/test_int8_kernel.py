"""kvcli's int8 decode kernel (kvcli/models/int8_rows.c, built by kvcli/models/int8_kernel.py):
its numbers against torch's kernel and the exact product, its build (once, into KVCLI_HOME, a
temporary folder where that cannot be written), and the fallback to torch's kernel with the reason."""

from __future__ import annotations

import stat

import pytest
import torch
from torch import nn

from kvcli.errors import ModelError
from kvcli.models import int8_kernel
from kvcli.models.weights import Int8Linear


@pytest.fixture
def fresh(monkeypatch):
    """`int8_kernel` decides again (its choice is cached per process), and again after the test."""
    monkeypatch.delenv("KVCLI_INT8_KERNEL", raising=False)
    int8_kernel._library.cache_clear()
    yield
    int8_kernel._library.cache_clear()


@pytest.fixture
def kernel(fresh, home):
    if int8_kernel.name() != int8_kernel.KVCLI:
        pytest.skip(f"kvcli's int8 kernel does not run here: {int8_kernel.why_not()}")


def weights(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = (torch.rand(out_features, generator=generator) / 50 + 1e-3).bfloat16()
    return qweight, scale


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("out_features, in_features", [(128, 896), (7, 100), (33, 31), (64, 4864)])
def test_the_kernel_computes_the_int8_weights_product(kernel, rows, out_features, in_features):
    """Any width (a vector body and a scalar tail), any row count: the exact product of the
    bfloat16 rows and the scaled int8 weight, rounded once to bfloat16; torch's kernel, where it
    takes the width, gives the same numbers up to the order of summation."""
    qweight, scale = weights(out_features, in_features, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(9)).bfloat16()
    got = int8_kernel.rows_product(x, qweight, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    exact = (x.double() @ qweight.double().T) * scale.double()
    assert torch.allclose(got.double(), exact, rtol=2 ** -8, atol=1e-6 * exact.abs().max().item())
    if in_features % 16 == 0:
        theirs = torch.ops.aten._weight_int8pack_mm(x, qweight, scale).double()
        assert ((got.double() - theirs).abs() <= 2 ** -7 * theirs.abs() + 1e-6 * theirs.abs().max()).all()


def test_threads_do_not_change_the_numbers(kernel):
    """Each output is one thread's sum: one thread and two give the same bits."""
    qweight, scale = weights(1000, 896)
    x = torch.randn(2, 896).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_kernel.rows_product(x, qweight, scale)
        torch.set_num_threads(2)
        two = int8_kernel.rows_product(x, qweight, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_a_layer_decodes_on_the_kernel_and_prefills_widened(kernel, monkeypatch):
    """`Int8Linear` sends a decode step's rows to the kernel (its exact numbers), a prefill's to the widened product."""
    calls = []
    real = int8_kernel.rows_product
    monkeypatch.setattr(int8_kernel, "rows_product", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    torch.manual_seed(3)
    layer = Int8Linear.of(nn.Linear(96, 40, bias=True))
    step, prefill = torch.randn(1, 1, 96), torch.randn(1, 300, 96)
    out = layer(step)
    expected = int8_kernel.rows_product(step[0].bfloat16(), layer.qweight, layer.scale).float() + layer.bias
    assert torch.equal(out[0], expected)
    calls.clear()
    layer(prefill)
    assert calls == []


def test_it_is_built_once_into_kvcli_home(kernel, home):
    built = sorted((home / "kernels").glob("int8_rows-*.so"))
    assert len(built) == 1
    made = built[0].stat().st_mtime_ns
    int8_kernel._library.cache_clear()
    assert int8_kernel.name() == int8_kernel.KVCLI and built[0].stat().st_mtime_ns == made
    assert sorted((home / "kernels").iterdir()) == built  # no scratch folder left behind


def test_an_unwritable_home_builds_in_the_temporary_folder(fresh, home, tmp_path, monkeypatch):
    if int8_kernel._library()[0] is None:
        pytest.skip(f"kvcli's int8 kernel does not run here: {int8_kernel.why_not()}")
    int8_kernel._library.cache_clear()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where KVCLI_HOME should be a folder")
    monkeypatch.setenv("KVCLI_HOME", str(blocked))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert int8_kernel.name() == int8_kernel.KVCLI
    assert list((tmp_path / "tmp").glob("kvcli-kernels-*/int8_rows-*.so"))


def failing_compiler(tmp_path) -> str:
    script = tmp_path / "cc"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'broken-cc 1.0'; exit 0; fi\n"
                      "echo 'int8_rows.c:1: error: this compiler is broken on purpose' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_failed_build_falls_back_to_torch_and_says_why(fresh, home, tmp_path, monkeypatch):
    """No kernel is no error: torch's computes the products, `why_not` names the compiler's last
    line, and a layer still computes its product. Asked for by name, the failure is one line."""
    monkeypatch.setenv("CC", failing_compiler(tmp_path))
    assert int8_kernel.name() == int8_kernel.TORCH
    assert "could not build int8_rows.c" in int8_kernel.why_not() and "broken on purpose" in int8_kernel.why_not()
    layer = Int8Linear.of(nn.Linear(64, 32, bias=False))
    x = torch.randn(1, 64)
    assert torch.allclose(layer(x), x @ layer.dequantized().float().T, rtol=2e-2, atol=1e-2)
    monkeypatch.setenv("KVCLI_INT8_KERNEL", "kvcli")
    with pytest.raises(ModelError, match="KVCLI_INT8_KERNEL=kvcli, but kvcli's int8 kernel cannot run here: .*could not build"):
        int8_kernel.name()


def test_torch_s_kernel_can_be_forced(fresh, home, monkeypatch):
    monkeypatch.setenv("KVCLI_INT8_KERNEL", "torch")
    assert int8_kernel.name() == int8_kernel.TORCH and int8_kernel.why_not() == "KVCLI_INT8_KERNEL=torch"
    qweight, scale = weights(16, 64)
    assert int8_kernel.rows_product(torch.randn(1, 64).bfloat16(), qweight, scale) is None
    assert not (home / "kernels").exists()


def test_the_blocked_layout_holds_the_same_weight(kernel):
    """Blocked in place and back, the weight is the same bytes; its rows looked up blocked are the row-major rows."""
    qweight, _ = weights(4864, 96)
    blocked = qweight.clone()
    int8_kernel.to_blocked(blocked, rows_at_once=100)  # chunks that are not a multiple of the block: rounded to one
    assert not torch.equal(blocked, qweight) and torch.equal(int8_kernel.from_blocked(blocked), qweight)
    ids = torch.tensor([[0, 15, 16, 4863], [17, 17, 2000, 1]])
    assert torch.equal(int8_kernel.blocked_rows(blocked, ids), qweight[ids])


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("out_features, in_features", [(4864, 896), (32, 4864), (16, 16)])
def test_the_blocked_product_is_the_row_major_product(kernel, rows, out_features, in_features):
    qweight, scale = weights(out_features, in_features, seed=rows)
    blocked = qweight.clone()
    int8_kernel.to_blocked(blocked)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = int8_kernel.rows_product(x, blocked, scale, blocked=True).double()
    exact = (x.double() @ qweight.double().T) * scale.double()
    assert torch.allclose(got, exact, rtol=2 ** -8, atol=1e-6 * exact.abs().max().item())
    row_major = int8_kernel.rows_product(x, qweight, scale).double()
    assert ((got - row_major).abs() <= 2 ** -7 * row_major.abs() + 1e-6 * row_major.abs().max()).all()


def test_a_blocked_layer_and_its_tied_embedding_compute_what_they_did(kernel, tmp_path):
    """After `block_for_decode`, a layer's decode and prefill products and the tied embedding's
    lookups are what they were row-major; a shape the layout does not take stays row-major; a
    blocked model cannot be saved as if it were row-major."""
    from test_weights import tiny

    from kvcli.models.weights import block_for_decode, quantize_model, save_quantized

    model = tiny(tied=True)
    quantize_model(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 63, 5]])
    step, prefill = torch.randn(1, 1, 64), torch.randn(1, 40, 64)
    before = (head(step), head(prefill), embedding(ids))
    odd = Int8Linear.of(nn.Linear(24, 40, bias=False))
    assert block_for_decode(model) == len([m for m in model.modules() if isinstance(m, Int8Linear)]) and head.blocked
    assert not odd.block_for_decode()
    after = (head(step), head(prefill), embedding(ids))
    assert torch.allclose(after[0], before[0], rtol=2 ** -7, atol=1e-3) and torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])
    with pytest.raises(ValueError, match="row-major"):
        save_quantized(model, tmp_path / "saved", "")
    assert not (tmp_path / "saved").exists()


def test_an_int8_load_blocks_its_weights_where_the_kernel_runs(kernel, tmp_path):
    from test_models import save_tiny_llama

    from kvcli.models import load_model

    lm = load_model(str(save_tiny_llama(tmp_path / "tiny_llama")), dtype="int8")
    layers = [m for m in lm.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.blocked == (m.out_features % 16 == 0 and m.in_features % 16 == 0) for m in layers)
    assert any(m.blocked for m in layers)


def test_a_kernel_asked_for_that_cannot_run_is_one_line_before_the_load(fresh, home, tmp_path, monkeypatch):
    """`KVCLI_INT8_KERNEL=kvcli` where the build fails, or a value that names no kernel: `ask` stops
    with one line saying what to do, before reading the document or the weights."""
    from test_models import save_tiny_llama
    from typer.testing import CliRunner

    from kvcli.cli import app

    folder = save_tiny_llama(tmp_path / "tiny_llama")
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 " * 20)
    monkeypatch.setenv("CC", failing_compiler(tmp_path))
    for value, says in (("kvcli", "cannot run here"), ("fast", "is not a kernel: use kvcli, torch or auto")):
        int8_kernel._library.cache_clear()
        monkeypatch.setenv("KVCLI_INT8_KERNEL", value)
        result = CliRunner().invoke(app, ["ask", str(doc), "w1?", "-m", str(folder), "--dtype", "int8", "--max-new-tokens", "2"])
        assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit), result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"KVCLI_INT8_KERNEL={value}" in lines[0] and says in lines[0], result.stderr


def test_a_shape_the_blocked_layout_does_not_take_is_an_internal_error_not_a_memory_one(kernel):
    qweight, scale = weights(7, 100)
    with pytest.raises(RuntimeError, match=r"internal: .*refused a \(7, 100\) weight as blocked \(status -2\)"):
        int8_kernel.rows_product(torch.randn(1, 100).bfloat16(), qweight, scale, blocked=True)
