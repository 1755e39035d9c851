"""The command line as users meet it: answers on stdout, reports on stderr, one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcli.cli import app

runner = CliRunner()
SAMPLE = "samples/python_exceptions.txt"


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_one_line_error(result, *words: str) -> None:
    """A non-zero exit, one short line on stderr naming the problem, and no traceback."""
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvcli: error:")
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


def test_missing_file_is_one_line_error(tmp_path):
    """A path that does not exist exits non-zero with one line naming it."""
    assert_one_line_error(run("ask", str(tmp_path / "nope.pdf"), "q?"), "nope.pdf")


def test_empty_file_is_one_line_error(tmp_path):
    """An empty file exits non-zero with one line saying it is empty."""
    path = tmp_path / "empty.txt"
    path.write_text("")
    assert_one_line_error(run("ask", str(path), "q?"), "empty")


def test_binary_file_is_one_line_error(tmp_path):
    """A binary file exits non-zero with one line saying it looks binary."""
    path = tmp_path / "blob.dat"
    path.write_bytes(b"\x00\x01\x02" * 100)
    assert_one_line_error(run("ask", str(path), "q?"), "binary")


def test_invalid_pdf_is_one_line_error(tmp_path):
    """A .pdf that is not a PDF exits non-zero with one line saying so."""
    path = tmp_path / "fake.pdf"
    path.write_text("this is not a pdf")
    assert_one_line_error(run("ask", str(path), "q?"), "PDF")


@pytest.mark.parametrize("ratio", ["0", "-0.1", "1.5"])
def test_ratio_outside_range_is_one_line_error(ratio):
    """--ratio outside (0, 1] exits non-zero with one line naming the range."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "--ratio", ratio), "(0, 1]")


def test_unknown_method_is_one_line_error():
    """An unknown --method exits non-zero with one line listing the methods."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "--method", "magic"), "magic", "dynamickv")


def test_budget_not_above_window_is_one_line_error():
    """A --budget that does not exceed the window exits non-zero with one line."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "--budget", "8"), "window")


def test_missing_model_path_is_one_line_error(tmp_path):
    """A --model path that does not exist exits non-zero with one line naming it."""
    assert_one_line_error(run("ask", SAMPLE, "q?", "-m", str(tmp_path / "missing-model")), "missing-model")


def test_empty_question_is_one_line_error():
    """An empty question exits non-zero with one line."""
    assert_one_line_error(run("ask", SAMPLE, "  "), "question")


def test_question_without_documents_is_one_line_error():
    """`ask` with only a question exits non-zero and says how to call it."""
    assert_one_line_error(run("ask", "what?"), "question")


def test_methods_lists_every_registered_method():
    """`kvcli methods --json` lists each method with its parameters."""
    from kvcli.methods import REGISTRY

    result = run("methods", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == list(REGISTRY)
    assert next(r for r in rows if r["name"] == "dynamickv")["params"]["window_size"] == 8


@pytest.mark.model
def test_answer_on_stdout_report_on_stderr(smollm, model_home, monkeypatch):
    """The answer alone goes to stdout; the per-layer report goes to stderr."""
    monkeypatch.setenv("KVCLI_HOME", str(model_home))
    result = run("ask", SAMPLE, "What does the assert statement do?", "-m", "smollm2-135m", "--max-new-tokens", "12", "--max-context", "1500")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() and "layer" not in result.stdout and "KV cache" not in result.stdout
    assert "retained tokens per layer" in result.stderr and "KV cache" in result.stderr
    assert "decode" in result.stderr and "prefill" in result.stderr


@pytest.mark.model
def test_json_report_has_documented_keys(smollm, model_home, monkeypatch):
    """--json prints one object whose stats carry every documented key, per-layer counts summing to the budget."""
    monkeypatch.setenv("KVCLI_HOME", str(model_home))
    result = run("ask", SAMPLE, "What does the assert statement do?", "-m", "smollm2-135m", "--max-new-tokens", "8", "--max-context", "1500", "--cut-middle", "--method", "dynamickv", "--ratio", "0.05", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    stats = data["stats"]
    for key in ("method", "ratio", "prompt_tokens", "retained_per_layer", "kv_bytes_full", "kv_bytes_kept", "peak_memory_bytes", "load_s", "prefill_s", "ttft_s", "decode_tokens_per_s"):
        assert key in stats, key
    assert isinstance(data["answer"], str) and data["answer"]
    retained = stats["retained_per_layer"]
    assert len(retained) == 30 and len(set(retained)) > 1
    question = stats["extra"]["question_tokens"]  # kept whole in every layer beside the document's budget
    assert sum(retained) == round(0.05 * (stats["prompt_tokens"] - question) * 30) + question * 30
    assert stats["kv_bytes_kept"] * stats["prompt_tokens"] * 30 == stats["kv_bytes_full"] * sum(retained)  # the bytes of what was kept
