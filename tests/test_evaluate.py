"""kvcli eval: one prefill per row, the modes, resume on a tiny model, the command, and eval answering as ask does.

Metrics, rows, the log, summaries and tables are tested model-free in tests/test_eval_*.py, and
the commands docs/eval.md shows in tests/test_eval_docs.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from helpers_text import prose
from kvcli.cli import app
from kvcli.errors import BudgetError, InputError
from kvcli.eval import EvalConfig, Row, log_header, log_path, read_rows, render, rouge_l, row_hash, run_eval
from kvcli.ingest import read_documents
from kvcli.methods import make_method
from kvcli.models import LoadedModel
from kvcli.reading import Reader
from kvcli.reading import prefix as prefix_module
from kvcli.reading import query as query_module
from test_eval_results import render_text, table_cells
from test_models import save_tiny_llama

# The keys docs/eval.md documents for each sample and summary entry.
SAMPLE_KEYS = {"id", "method", "budget", "ratio", "mode", "chunk_size", "prediction", "score", "compressed", "row_hash"}
SUMMARY_KEYS = {"method", "budget", "ratio", "mode", "chunk_size", "score", "n", "pct_of_full", "n_full_cache"}


pytestmark = pytest.mark.usefixtures("one_thread")




def save_tiny_eval_model(folder: Path) -> Path:
    """save_tiny_llama's two-layer model with positions for long prompts: 128 would cut every
    document to a few tokens and refuse a --max-new-tokens above the context."""
    return save_tiny_llama(folder, max_positions=32768)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny random Llama saved as a folder, for `-m` in CLI runs; loads in milliseconds."""
    return str(save_tiny_eval_model(tmp_path_factory.mktemp("tiny") / "tiny_llama"))


def tiny_words(n: int) -> str:
    """Text the tiny folder model's word-level tokenizer knows."""
    return " ".join(f"w{i % 60}" for i in range(n))


# --- run_eval on a tiny random model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reader(tokenizer):
    """A 4-layer grouped-query Llama with random weights and SmolLM2's tokenizer, as a Reader."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    lm = LoadedModel(
        model=model, tokenizer=tokenizer, name="tiny", device=torch.device("cpu"), dtype=torch.float32,
        load_s=0.0, converted=False, config_hash="tiny",
    )
    return Reader(lm)


@pytest.fixture
def counted_captures(monkeypatch):
    """Every full-cache capture run_eval makes, as (prompt length, accumulated, reading mode)."""
    calls = []
    for module, mode in ((query_module, "query"), (prefix_module, "reuse")):
        real = module.capture

        def wrapper(model, input_ids, window_size, accumulated=False, *args, _real=real, _mode=mode, **kwargs):
            calls.append((input_ids.shape[1], accumulated, _mode))
            return _real(model, input_ids, window_size, accumulated, *args, **kwargs)

        monkeypatch.setattr(module, "capture", wrapper)
    return calls


def tiny_rows(haystack: str) -> list[Row]:
    return [
        Row("a", haystack[:600], "What is described?", ["exception"]),
        Row("b", haystack[600:1300], "", ["the statement"]),
    ]


def config(names, budgets=None, ratios=None, metric="contains", max_new_tokens=3, **fields) -> EvalConfig:
    """An EvalConfig of the methods `names` at their defaults."""
    return EvalConfig([make_method(name) for name in names], budgets, ratios, metric, max_new_tokens, **fields)


@pytest.mark.model
def test_run_eval_captures_once_per_row(tiny_reader, haystack, counted_captures, tmp_path):
    """One capture per row serves every method x budget; full runs once; the result has the documented keys."""
    rows = tiny_rows(haystack)
    seen = []
    result = run_eval(tiny_reader, rows, config(["full", "snapkv", "h2o"], [16, 10_000], metric="qa_f1"), tmp_path / "log.jsonl",
                      progress=lambda d, t: seen.append((d, t)))
    assert len(counted_captures) == len(rows)
    assert all(accumulated for _, accumulated, _ in counted_captures)  # h2o needs all-query attention
    assert len(result.samples) == len(rows) * (1 + 2 * 2)
    assert seen[-1] == (len(result.samples), len(result.samples))
    hashes = {row.id: row_hash(row) for row in rows}
    for sample in result.samples:
        assert sample.keys() == SAMPLE_KEYS and 0 <= sample["score"] <= 1
        assert sample["row_hash"] == hashes[sample["id"]]
    full = {s["id"]: s["prediction"] for s in result.samples if s["method"] == "full"}
    for sample in result.samples:
        if sample["budget"] == 10_000:  # the prompt fits: the full cache, recorded as such
            assert sample["compressed"] is False and sample["prediction"] == full[sample["id"]]
        elif sample["budget"] == 16:
            assert sample["compressed"] is True
    data = json.loads(json.dumps(result.to_dict()))
    assert list(data) == ["model", "metric", "modes", "chunk_size", "method_params", "summary", "samples", "timing"]  # no niah without a grid
    assert data["method_params"]["snapkv"]["window_size"] == 8 and set(data["method_params"]) == {"full", "snapkv", "h2o"}
    assert [(e["method"], e["budget"]) for e in data["summary"]] == [("full", None), ("snapkv", 16), ("snapkv", 10_000), ("h2o", 16), ("h2o", 10_000)]
    for entry in data["summary"]:
        assert entry.keys() == SUMMARY_KEYS and entry["n"] == len(rows)
    assert [t["id"] for t in data["timing"]["rows"]] == ["a", "b"]
    summary = {(e["method"], e["budget"]): e for e in result.summary}
    full_entry = summary[("full", None)]
    for method in ("snapkv", "h2o"):
        # every prompt fits 10,000 tokens: the same answers as full, so the same mean and 100% of it
        fits = summary[(method, 10_000)]
        assert fits["score"] == full_entry["score"] and fits["pct_of_full"] == (100.0 if full_entry["score"] else None)
        assert fits["n_full_cache"] == len(rows) and summary[(method, 16)]["n_full_cache"] == 0

    def shown(entry: dict) -> str:  # a cell: the mean, then its % of full when there is one
        pct = entry["pct_of_full"]
        return f"{entry['score']:.2f}" + ("" if pct is None else f" ({pct:.0f}%)")

    assert table_cells(render_text(render(result))) == {
        "method": ["budget 16", "budget 10000"],
        "full": [f"{full_entry['score']:.2f}"] * 2,  # full is the reference: no % of itself
        "snapkv": [shown(summary[("snapkv", 16)]), shown(summary[("snapkv", 10_000)])],
        "h2o": [shown(summary[("h2o", 16)]), shown(summary[("h2o", 10_000)])],
    }


@pytest.mark.model
def test_run_eval_resumes_from_its_log(tiny_reader, haystack, counted_captures, tmp_path):
    """A rerun skips finished combinations: no capture when all are done, only the missing ones after a cut."""
    rows = tiny_rows(haystack)
    settings = config(["full", "streamingllm"], ratios=[0.2, 0.5])
    out = tmp_path / "log.jsonl"
    first = run_eval(tiny_reader, rows, settings, out)
    assert len(counted_captures) == 2
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + len(first.samples)  # a header, then one line per sample

    again = run_eval(tiny_reader, rows, config(["full", "streamingllm"], ratios=[0.2, 0.5], metric="rouge_l"), out)
    assert len(counted_captures) == 2  # nothing left to do
    assert [s["prediction"] for s in again.samples] == [s["prediction"] for s in first.samples]
    answers = {row.id: row.answers for row in rows}
    assert again.metric == "rouge_l"  # stored predictions are rescored with the new metric
    assert [s["score"] for s in again.samples] == [rouge_l(s["prediction"], answers[s["id"]]) for s in again.samples]

    # An interrupted run: row b's last sample is missing and a line was half written.
    out.write_text("\n".join(lines[:-1]) + '\n{"id": "b", "meth')
    resumed = run_eval(tiny_reader, rows, settings, out)
    assert [n for n, _, _ in counted_captures[2:]] == [counted_captures[1][0]]  # only row b read again
    assert resumed.samples == first.samples

    with pytest.raises(InputError, match="max_new_tokens"):
        run_eval(tiny_reader, rows, config(["full", "streamingllm"], ratios=[0.2], max_new_tokens=5), out)


@pytest.mark.model
def test_run_eval_with_a_larger_limit_resumes_and_reads_only_the_new_rows(tiny_reader, haystack, counted_captures, tmp_path):
    """A rerun with a larger --limit takes the logged rows from the log and reads only the new ones; a smaller one reads none."""
    data = tmp_path / "d.jsonl"  # no _id: the ids are line numbers
    data.write_text("".join(json.dumps({"context": row.context, "input": row.input, "answers": row.answers}) + "\n" for row in tiny_rows(haystack)))
    settings = config(["full", "snapkv"], [16])
    out = tmp_path / "log.jsonl"
    first = run_eval(tiny_reader, read_rows(data, limit=1), settings, out)
    assert len(counted_captures) == 1
    header_and_first = out.read_text()

    more = run_eval(tiny_reader, read_rows(data, limit=2), settings, out)
    assert more.timing["resumed_samples"] == 2 and len(counted_captures) == 2  # only row 1 was read
    assert more.samples[:2] == first.samples
    assert [s["id"] for s in more.samples] == ["0", "0", "1", "1"]
    logged = out.read_text()
    assert logged.startswith(header_and_first) and len(logged.splitlines()) == 1 + 4  # no second header

    fewer = run_eval(tiny_reader, read_rows(data, limit=1), settings, out)
    assert len(counted_captures) == 2 and fewer.samples == first.samples and out.read_text() == logged


@pytest.mark.model
def test_run_eval_modes_read_each_prompt_once(tiny_reader, haystack, counted_captures):
    """query and reuse take one capture each, chunked prefills on its own; full appears once per prompt, % of full uses that prompt's."""
    rows = tiny_rows(haystack)[:1]
    result = run_eval(tiny_reader, rows, config(["full", "snapkv"], [16], max_new_tokens=4, modes=("query", "reuse", "chunked"), chunk_size=32))
    by_mode = {(s["method"], s["mode"]): s for s in result.samples}
    # full once per prompt (query-aware and reused); chunking only applies when compressing
    assert sorted(by_mode) == [("full", "query"), ("full", "reuse"), ("snapkv", "chunked"), ("snapkv", "query"), ("snapkv", "reuse")]
    assert [mode for _, _, mode in counted_captures] == ["query", "reuse"]  # the query prompt and the reused prefix
    assert by_mode[("snapkv", "chunked")]["chunk_size"] == 32 and by_mode[("snapkv", "query")]["chunk_size"] is None
    assert all(by_mode[("snapkv", mode)]["compressed"] for mode in ("query", "reuse", "chunked"))

    summary = {(e["method"], e["mode"]): e for e in result.summary}
    assert summary[("snapkv", "chunked")]["chunk_size"] == 32
    # one row: % of full is 100 x the score over the full cache's score on the prompt read the same
    # way (chunked reads share the query-aware prompt's), None where that full score is 0
    full_score = {"query": summary[("full", "query")]["score"], "reuse": summary[("full", "reuse")]["score"]}
    for (method, mode), entry in summary.items():
        reference = full_score["reuse" if mode == "reuse" else "query"]
        assert entry["pct_of_full"] == (pytest.approx(100 * entry["score"] / reference) if reference else None), (method, mode)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["modes"] == ["query", "reuse", "chunked"] and data["chunk_size"] == 32
    assert list(table_cells(render_text(render(result)))) == ["method", "full", "snapkv", "full (reuse)", "snapkv (reuse)", "snapkv (chunked 32)"]


@pytest.mark.model
def test_run_eval_resumes_each_mode_apart(tiny_reader, haystack, counted_captures, tmp_path):
    """A log holds samples of several modes and chunk sizes; a rerun redoes only those with a new chunk size."""
    rows = tiny_rows(haystack)[:1]
    out = tmp_path / "log.jsonl"
    run_eval(tiny_reader, rows, config(["full", "snapkv"], [16], modes=("query", "chunked"), chunk_size=32), out)
    assert len(counted_captures) == 1
    again = run_eval(tiny_reader, rows, config(["full", "snapkv"], [16], modes=("chunked", "query"), chunk_size=48), out)
    assert again.timing["resumed_samples"] == 2  # full and query-aware snapkv; chunked at 48 is new
    assert len(counted_captures) == 1  # chunked prefills on its own, no capture
    assert [(s["mode"], s["chunk_size"]) for s in again.samples if s["method"] == "snapkv"] == [("chunked", 48), ("query", None)]


# --- resume refuses other data, model-free -----------------------------------------------------

DATA_ROWS = [Row("0", "The cat sat on the mat.", "Who sat?", ["the cat"]), Row("1", "It rained all day.", "What happened?", ["rain"])]
# The same ids (line numbers, as for rows without _id) over other lines.
OTHER_DATA_ROWS = [Row("0", "The dog sat on the rug.", "Who sat?", ["the dog"]), Row("1", "It snowed all day.", "What happened?", ["snow"])]
HEADER = log_header("stub", "c0", [make_method("full")], 4, None, None)


def stub_reader():
    """Enough of a reader for run_eval when every sample is already in the log: the model's name and config hash."""
    return SimpleNamespace(lm=SimpleNamespace(name="stub", config_hash="c0"))


def finished_log(path, rows: list[Row], hashes: list[str | None]):
    """A log holding HEADER and a full-cache answer to each of `rows`, with `hashes` as their row_hash (None: no row_hash)."""
    samples = []
    for row, digest in zip(rows, hashes):
        sample = {"id": row.id, "method": "full", "budget": None, "ratio": None, "mode": "query", "chunk_size": None,
                  "prediction": f"logged answer {row.id}", "score": 0.0, "compressed": False}
        if digest is not None:
            sample["row_hash"] = digest
        samples.append(sample)
    path.write_text("".join(json.dumps(record) + "\n" for record in [HEADER, *samples]))
    return path


def rerun(rows: list[Row], out):
    """run_eval with only `full`, 4 tokens an answer, as the logs here were written."""
    return run_eval(stub_reader(), rows, config(["full"], [64], max_new_tokens=4), out)


def test_run_eval_resumes_a_log_written_for_the_same_rows(tmp_path):
    """Samples whose row_hash matches their row are reused: every sample comes from the log and nothing is appended."""
    out = finished_log(tmp_path / "log.jsonl", DATA_ROWS, [row_hash(row) for row in DATA_ROWS])
    before = out.read_text()
    result = rerun(DATA_ROWS, out)
    assert result.timing["resumed_samples"] == 2
    assert [s["prediction"] for s in result.samples] == ["logged answer 0", "logged answer 1"]
    assert out.read_text() == before


@pytest.mark.parametrize("rows", [OTHER_DATA_ROWS, [DATA_ROWS[0], OTHER_DATA_ROWS[1]]], ids=["every-row", "second-row"])
def test_run_eval_refuses_a_log_written_for_other_rows_with_the_same_ids(tmp_path, rows):
    """A rerun on other rows under the same ids (line numbers) is a one-line InputError naming the row, not the old predictions."""
    out = finished_log(tmp_path / "log.jsonl", DATA_ROWS, [row_hash(row) for row in DATA_ROWS])
    before = out.read_text()
    changed = next(row for row, old in zip(rows, DATA_ROWS) if row != old)
    with pytest.raises(InputError, match="read from other data") as info:
        rerun(rows, out)
    message = str(info.value)
    assert "\n" not in message and f"row {changed.id!r}" in message and str(out) in message
    assert message.endswith("delete it or write to another --output file")
    assert out.read_text() == before


def test_run_eval_refuses_a_sample_without_a_row_hash(tmp_path):
    """A log from before samples recorded their row (no row_hash) is refused, not reused."""
    out = finished_log(tmp_path / "log.jsonl", DATA_ROWS, [row_hash(DATA_ROWS[0]), None])
    with pytest.raises(InputError, match="row '1' read from other data"):
        rerun(DATA_ROWS, out)


def test_a_logged_full_answer_for_other_data_is_never_reused(tmp_path):
    """A rerun without `full` refuses a log whose full-cache answer was read from other data, before any row is read
    (a setting that keeps every token would otherwise return that answer)."""
    out = finished_log(tmp_path / "log.jsonl", DATA_ROWS, [row_hash(row) for row in DATA_ROWS])
    with pytest.raises(InputError, match="read from other data"):
        run_eval(stub_reader(), OTHER_DATA_ROWS, config(["snapkv"], [100000], max_new_tokens=4), out)


def test_run_eval_refuses_bad_settings():
    """Budgets and ratios together, no methods, budgets within the window, unknown metrics and modes fail before any work."""
    snapkv = ["snapkv"]
    with pytest.raises(BudgetError, match="not both"):
        run_eval(None, [], config(snapkv, [64], [0.1]))
    with pytest.raises(InputError, match="no methods"):
        run_eval(None, [], config([], [64]))
    with pytest.raises(BudgetError, match="window"):
        run_eval(None, [], config(snapkv, [8]))
    with pytest.raises(InputError, match="unknown metric"):
        run_eval(None, [], config(snapkv, [64], metric="bleu"))
    with pytest.raises(InputError, match="unknown mode"):
        run_eval(None, [], config(snapkv, [64], modes=("query", "batch")))
    with pytest.raises(InputError, match="chunk-size"):
        run_eval(None, [], config(snapkv, [64], modes=("chunked",), chunk_size=8))
    with pytest.raises(InputError, match="max-new-tokens"):
        run_eval(None, [], config(snapkv, [64], max_new_tokens=0))


# --- the command ------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize(
    "args, word",
    [
        (["--data", "missing.jsonl"], "missing.jsonl"),
        (["--data", "x.jsonl", "--budgets", "64", "--ratios", "0.1"], "not both"),
        (["--data", "x.jsonl", "--metric", "bleu"], "bleu"),
        (["--data", "x.jsonl", "--methods", "full,nope"], "nope"),
        (["--data", "x.jsonl", "--methods", " , "], "--methods"),
        (["--data", "x.jsonl", "--modes", "query,later"], "later"),
        (["--data", "x.jsonl", "--chunk-size", "512"], "--modes chunked"),
        (["--data", "x.jsonl", "--modes", "chunked", "--chunk-size", "4"], "--chunk-size"),
        (["--data", "x.jsonl", "--param", "nosuchknob=1"], "nosuchknob"),
        (["--data", "x.jsonl", "--methods", "full,snapkv", "--param", "max_multiple=5"], "max_multiple"),
        (["--data", "x.jsonl", "--param", "max_multiple"], "KEY=VALUE"),
        (["--data", "x.jsonl", "-o", "nofolder/out.json"], "nofolder"),
        (["--data", "x.jsonl", "--haystack", "x.jsonl"], "--niah"),
        (["--niah"], "--haystack"),
    ],
)
def test_eval_bad_input_is_one_line_error(tmp_path, monkeypatch, args, word):
    """Bad input to eval exits non-zero with one line on stderr naming it, before loading a model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text(json.dumps({"context": "c", "input": "q", "answers": ["a"]}) + "\n")
    result = runner.invoke(app, ["eval", *args, "-m", str(tmp_path / "no-model")])
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvcli: error:") and word in lines[0], result.stderr
    assert result.stdout == ""


def test_eval_param_applies_to_the_methods_that_have_it(tiny_folder, tmp_path, monkeypatch):
    """`--methods all --param max_multiple=5` runs: dynamickv gets the knob, the methods without it (full among them) keep theirs."""
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"context": tiny_words(60), "input": "w1 w2?", "answers": ["w3"]}) + "\n")
    out = tmp_path / "out.json"
    result = runner.invoke(app, [
        "eval", "--data", str(data), "--methods", "all", "--param", "max_multiple=5", "--budgets", "16",
        "--max-new-tokens", "2", "-m", tiny_folder, "-o", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    header = json.loads(log_path(out).read_text().splitlines()[0])
    assert header["methods"]["dynamickv"]["max_multiple"] == 5.0
    assert make_method("dynamickv").params()["max_multiple"] != 5.0
    for name, params in header["methods"].items():
        if name != "dynamickv":
            assert params == make_method(name).params(), name
    assert [e["method"] for e in json.loads(out.read_text())["summary"]] == list(header["methods"])


@pytest.mark.model
def test_eval_niah_writes_the_documented_json(smollm, model_home, haystack, monkeypatch, tmp_path):
    """-o writes the JSON (summary, samples, a grid per method) with the table on stdout; --json prints that JSON instead."""
    monkeypatch.setenv("KVCLI_HOME", str(model_home))
    (tmp_path / "hay.txt").write_text(haystack)
    out = tmp_path / "niah.json"
    command = [
        "eval", "--niah", "--haystack", str(tmp_path / "hay.txt"), "--lengths", "250,350", "--depths", "0,1",
        "--methods", "full,snapkv", "--budgets", "64", "--max-new-tokens", "6", "-m", "smollm2-135m", "-o", str(out),
    ]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.stderr
    assert "needle found: full" in result.stdout and "needle found: snapkv at budget 64" in result.stdout
    data = json.loads(out.read_text())
    assert data["model"] == "smollm2-135m" and data["metric"] == "contains"
    assert len(data["samples"]) == 4 * 2
    assert all(s.keys() == SAMPLE_KEYS and s["score"] in (0.0, 1.0) for s in data["samples"])
    assert [(e["method"], e["budget"]) for e in data["summary"]] == [("full", None), ("snapkv", 64)]
    assert all(e.keys() == SUMMARY_KEYS and e["n"] == 4 for e in data["summary"])
    assert [(g["method"], g["lengths"], g["depths"]) for g in data["niah"]] == [("full", [250, 350], [0, 1]), ("snapkv", [250, 350], [0, 1])]
    assert all(len(g["scores"]) == 2 and all(len(r) == 2 for r in g["scores"]) for g in data["niah"])
    assert log_path(out).exists()

    # the same command again, with --json: every sample from the log, the result as JSON on stdout
    again = runner.invoke(app, [*command, "--json"])
    assert again.exit_code == 0, again.stderr
    printed = json.loads(again.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["timing"]["resumed_samples"] == 8 and printed["samples"] == data["samples"]
    assert "needle found" not in again.stdout


# --- eval reads as ask does -------------------------------------------------------------------------


@pytest.mark.model
def test_eval_predictions_are_what_ask_prints(smollm, model_home, monkeypatch, tmp_path):
    """eval's query, reuse and chunked predictions equal what `kvcli ask`, `ask --reuse` and `ask --chunk-size` print for the same row, method and budget."""
    monkeypatch.setenv("KVCLI_HOME", str(model_home))
    document = tmp_path / "doc.txt"
    document.write_text(prose(smollm.tokenizer, 500))
    question = "What does an assignment statement do?"
    data = tmp_path / "row.jsonl"  # the row: the document as ask reads it, and the question
    data.write_text(json.dumps({"_id": "r", "context": read_documents([str(document)]).text, "input": question, "answers": ["x"]}) + "\n")
    common = ["-m", "smollm2-135m", "--max-new-tokens", "12", "--json", "--quiet"]
    evaluated = runner.invoke(app, [
        "eval", "--data", str(data), "--methods", "snapkv", "--budgets", "32", "--modes", "query,reuse,chunked",
        "--chunk-size", "128", *common,
    ])
    assert evaluated.exit_code == 0, evaluated.output
    samples = {s["mode"]: s for s in json.loads(evaluated.stdout)["samples"]}
    assert sorted(samples) == ["chunked", "query", "reuse"] and all(s["compressed"] for s in samples.values())
    asked = {}
    for mode, flags in {"query": [], "reuse": ["--reuse", "--scorer", "instruction"], "chunked": ["--chunk-size", "128"]}.items():
        result = runner.invoke(app, ["ask", str(document), question, "--method", "snapkv", "--budget", "32", *flags, *common])
        assert result.exit_code == 0, result.output
        (line,) = result.stdout.splitlines()
        asked[mode] = json.loads(line)["answer"]
    assert {mode: s["prediction"] for mode, s in samples.items()} == asked
    assert len(set(asked.values())) == 3  # the three readings answer differently here: a mode read another way would show
