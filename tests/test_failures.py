"""Every way a run can fail, as users meet it: one `kvcli: error:` line, a non-zero exit, no traceback.

Model-free where possible: input checks run before any model loads, and the failures that need
a loaded model use a tiny random Llama saved in the test. Ctrl-C is tested on SmolLM2 in a real
subprocess, since only a real signal shows what a user sees.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import embedded_parts
from pdfutil import pdf_bytes
from test_ingest import encrypted
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import EXIT_INTERRUPTED, app

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "samples" / "python_exceptions.txt")
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *words: str) -> None:
    """A non-zero exit, one line on stderr starting `kvcli: error:` with `words`, no traceback, nothing on stdout."""
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvcli: error:"), lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A two-layer random Llama folder: loads in milliseconds, for failures that need a model."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny_llama"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty KVCLI_HOME, so nothing here touches the machine's model cache."""
    path = tmp_path / "kvcli_home"
    monkeypatch.setenv("KVCLI_HOME", str(path))
    return path


def tiny_words(n: int = 40) -> str:
    """Text the tiny model's word-level tokenizer knows."""
    return " ".join(f"w{i % 60}" for i in range(n))


# --- documents -------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    """A path that does not exist is named."""
    assert_one_line_error(run("ask", str(tmp_path / "nope.pdf"), "q?"), "nope.pdf", "does not exist")


def test_folder_without_readable_text(tmp_path):
    """A folder holding only binary and hidden files says it has no readable text."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "photo.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "d" / ".notes.txt").write_text("hidden")
    assert_one_line_error(run("ask", str(tmp_path / "d"), "q?"), "no readable text")


def test_encrypted_pdf(tmp_path):
    """A PDF that needs a password says so and how to decrypt it."""
    path = tmp_path / "secret.pdf"
    path.write_bytes(encrypted(pdf_bytes([["Hidden text."]]), "s3cret"))
    assert_one_line_error(run("ask", str(path), "q?"), "secret.pdf is encrypted", "decrypt")


def test_pdf_without_text_layer(tmp_path):
    """A scanned PDF (no text layer) says it looks scanned and suggests OCR."""
    path = tmp_path / "scan.pdf"
    path.write_bytes(pdf_bytes([[], []]))
    assert_one_line_error(run("ask", str(path), "q?"), "no text layer", "scanned", "OCR")


def test_binary_file(tmp_path):
    """A binary file given by name is refused."""
    path = tmp_path / "blob.dat"
    path.write_bytes(b"\x00\x01\x02" * 100)
    assert_one_line_error(run("ask", str(path), "q?"), "binary")


def test_non_utf8_text_is_read_with_a_warning(tmp_path, tiny_model, home):
    """Text that is not UTF-8 is not an error: it is read in the encoding detected and one warning names the file."""
    path = tmp_path / "latin.txt"
    path.write_bytes(f"caf\xe9 {tiny_words()}".encode("latin-1"))
    result = run("ask", str(path), "w1 w2?", "-m", tiny_model, "--method", "full", "--max-new-tokens", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "kvcli: warning" not in result.stderr  # --quiet silences warnings too
    result = run("ask", str(path), "w1 w2?", "-m", tiny_model, "--method", "full", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("kvcli: warning:")]
    assert len(warnings) == 1 and "latin.txt is not UTF-8: read as cp1252" in warnings[0]
    assert "Traceback" not in result.output


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question(question):
    """An empty or blank question is refused."""
    assert_one_line_error(run("ask", SAMPLE, question), "question is empty")


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.01"])
def test_ratio_outside_unit_interval(ratio):
    """--ratio outside (0, 1] names the range."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "--ratio", ratio), "(0, 1]")


def test_budget_not_above_the_window():
    """A --budget no larger than the observation window says which budget would work."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "--budget", "4", "--window", "8"), "window", "--budget 9")


def test_unknown_method():
    """An unknown --method lists the known ones."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "--method", "magic"), "magic", "dynamickv")


# --- models and devices ----------------------------------------------------------------------


def test_model_path_missing(tmp_path, home):
    """A --model path that does not exist is named."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "-m", str(tmp_path / "models" / "missing.gguf")), "missing.gguf", "does not exist")


def test_gguf_of_an_unsupported_architecture(tmp_path, home):
    """A GGUF whose architecture transformers cannot load names the architecture, and leaves no half conversion."""
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run("ask", SAMPLE, "q?", "-m", str(path)), "odd.gguf", "architecture 'notanarch'")
    models_dir = home / "models"
    assert not models_dir.exists() or not [p for p in models_dir.iterdir() if p.is_dir()]


def test_cuda_requested_without_cuda(monkeypatch, home):
    """--device cuda on a machine without CUDA says to use the CPU, before any model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(run("ask", SAMPLE, "q?", "-m", "smollm2-135m", "--device", "cuda"), "CUDA is not available", "--device cpu")


OUT_OF_MEMORY = [
    pytest.param(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of 23.6 GiB of which 1.2 GiB is free."), "3.50 GiB", id="cuda"),
    pytest.param(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"), "4.00 GiB", id="cpu"),
    pytest.param(MemoryError(), "", id="python"),
]


@pytest.mark.parametrize("error,needed", OUT_OF_MEMORY)
def test_out_of_memory_says_what_to_lower(error, needed, tiny_model, home, monkeypatch, tmp_path):
    """Running out of memory in the prefill says how much was asked for (when known) and suggests --ratio and --chunk-size."""
    import kvcli.reading.query

    doc = tmp_path / "doc.txt"
    doc.write_text(tiny_words())

    def prefill(*args, **kwargs):
        raise error

    monkeypatch.setattr(kvcli.reading.query, "prefill", prefill)
    result = run("ask", str(doc), "w1?", "-m", tiny_model, "--method", "snapkv", "--ratio", "0.5", "--max-new-tokens", "2")
    assert_one_line_error(result, "out of memory", needed, "--ratio", "--chunk-size")
    assert result.exit_code == 3


def test_a_bug_keeps_its_traceback(tiny_model, home, monkeypatch, tmp_path):
    """A RuntimeError that is not an allocation failure is a bug: it is not dressed up as a user error."""
    import kvcli.reading.query

    doc = tmp_path / "doc.txt"
    doc.write_text(tiny_words())

    def prefill(*args, **kwargs):
        raise RuntimeError("shape mismatch in attention")

    monkeypatch.setattr(kvcli.reading.query, "prefill", prefill)
    result = run("ask", str(doc), "w1?", "-m", tiny_model, "--ratio", "0.5", "--max-new-tokens", "2")
    assert isinstance(result.exception, RuntimeError)
    assert "kvcli: error" not in result.stderr


# --- user data -------------------------------------------------------------------------------


def test_ask_writes_nothing_next_to_the_documents(tmp_path, tiny_model, home, monkeypatch):
    """`ask` run inside the documents' folder leaves that folder exactly as it was (KVCLI_HOME is elsewhere)."""
    folder = tmp_path / "user"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "a.txt").write_text(tiny_words())
    (folder / "report.pdf").write_bytes(pdf_bytes([["w1 w2 w3."]]))
    monkeypatch.chdir(folder)
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    result = run("ask", "notes", "report.pdf", "w1?", "-m", tiny_model, "--ratio", "0.5", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before


# Two processes sharing an empty KVCLI_HOME: tests/test_models.py::test_two_processes_converting_at_once_convert_once


# --- Ctrl-C ----------------------------------------------------------------------------------


def read_until_text(proc: subprocess.Popen, timeout: float) -> bytes:
    """Bytes from the process's stdout, read until some non-blank text has arrived (or it exits)."""
    seen = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while not seen.strip() and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.model
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX signals")
def test_ctrl_c_keeps_the_answer_so_far(model_home):
    """Ctrl-C while the answer streams leaves the text so far on stdout, exits 130, and prints no traceback."""
    embedded_parts("smollm2-135m")
    question = "List every built-in exception the document describes and explain each one in detail."
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvcli", "ask", SAMPLE, question, "-m", "smollm2-135m", "--max-context", "1200", "--max-new-tokens", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "KVCLI_HOME": str(model_home)},
    )
    try:
        seen = read_until_text(proc, timeout=300)
        if proc.poll() is not None:
            pytest.fail(f"kvcli ended (rc {proc.returncode}) before Ctrl-C could be sent: {proc.stderr.read().decode()[-2000:]}")
        assert seen.strip(), "no answer text within 300 s"
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = (seen + rest).decode(), stderr.decode()
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert stdout.startswith(seen.decode()) and stdout.strip()
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "kvcli: interrupted"
