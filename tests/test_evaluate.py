"""kvcli eval: metrics, LongBench rows, the NIAH builder, one prefill per row, resume, and the command."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from helpers_text import prose
from kvcli import evaluate
from kvcli.cli import app
from kvcli.errors import BudgetError, InputError
from kvcli.evaluate import (
    METRICS, Row, choice, contains, insert_needle, log_path, niah_rows, prompt_parts, qa_f1, read_rows, render, rouge_l, run_eval,
    sentence_starts,
)
from kvcli.methods import make_method
from kvcli.models import LoadedModel
from kvcli.generate import Sampling, decode
from kvcli.pipeline import Engine, Options
from kvcli.prompt import build_prompt, summary_instruction

NEEDLE = "The secret ingredient of the harbour soup is smoked paprika."
QUESTION = "What is the secret ingredient of the harbour soup?"
SAMPLE_KEYS = {"id", "method", "budget", "ratio", "prediction", "score"}
SUMMARY_KEYS = {"method", "budget", "ratio", "score", "n"}


pytestmark = pytest.mark.usefixtures("one_thread")


# --- metrics --------------------------------------------------------------------------------------


def test_contains_is_case_insensitive_over_answers():
    """contains is 1 when any answer appears in the prediction, ignoring case."""
    assert contains("It was SMOKED Paprika, I think.", ["saffron", "smoked paprika"]) == 1.0
    assert contains("saffron", ["smoked paprika"]) == 0.0


def test_qa_f1_normalizes_and_takes_the_best_answer():
    """qa_f1 ignores case, punctuation and articles, and scores against the best answer."""
    assert qa_f1("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert qa_f1("eiffel tower in paris", ["Eiffel Tower"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert qa_f1("london", ["paris", "London."]) == 1.0
    assert qa_f1("nothing shared", ["paris"]) == 0.0
    assert qa_f1("", ["paris"]) == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    """rouge_l is the F1 of the LCS over normalized whitespace tokens."""
    # LCS of "cat sat on mat" and "cat was on mat" is "cat on mat": P = R = 3/4.
    assert rouge_l("The cat sat on the mat.", ["a cat was on a mat"]) == pytest.approx(0.75)
    assert rouge_l("x y z", ["z y x"]) == pytest.approx(1 / 3)
    assert rouge_l("same words here", ["no", "Same words, here!"]) == 1.0
    assert rouge_l("", ["anything"]) == 0.0


def test_choice_reads_the_first_standalone_letter():
    """choice takes the first standalone A-D in the prediction, not the A of 'Answer'."""
    assert choice("Answer: (B) because...", ["B"]) == 1.0
    assert choice("C. The third option, not A", ["C"]) == 1.0
    assert choice("A or B", ["B"]) == 0.0
    assert choice("I cannot tell", ["A"]) == 0.0
    assert choice("d", ["D"]) == 0.0  # lowercase letters are words, not choices


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_is_in_unit_interval(name):
    """Every metric returns a float in [0, 1] for matching, partial and empty predictions."""
    for prediction in ("A paris", "the answer is B, paris, france", ""):
        value = METRICS[name](prediction, ["Paris", "B"])
        assert isinstance(value, float) and 0.0 <= value <= 1.0


# --- rows -----------------------------------------------------------------------------------------


def write_jsonl(path, *lines: str):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_read_longbench_layout(tmp_path):
    """Rows keep _id or take the line index, and multi_news' NEWLINE_CHAR becomes a line break."""
    path = write_jsonl(
        tmp_path / "d.jsonl",
        json.dumps({"context": "a NEWLINE_CHAR b", "input": "", "answers": ["x NEWLINE_CHARy"], "_id": "first"}),
        "",
        json.dumps({"context": "c", "input": "q?", "answers": ["y"]}),
    )
    rows = read_rows(path)
    assert [r.id for r in rows] == ["first", "2"]
    assert rows[0].context == "a \n b" and rows[0].answers == ["x \ny"]
    assert rows[1].input == "q?"
    assert len(read_rows(path, limit=1)) == 1


@pytest.mark.parametrize(
    "bad, words",
    [
        ("{not json", ["invalid JSON"]),
        (json.dumps({"input": "q", "answers": ["a"]}), ["context"]),
        (json.dumps({"context": "c", "answers": []}), ["answers"]),
        (json.dumps({"context": "c", "answers": [1]}), ["answers"]),
        (json.dumps(["a list"]), ["JSON object"]),
        (json.dumps({"context": "c", "answers": ["a"], "_id": "one"}), ["repeats line 1"]),
    ],
)
def test_bad_rows_name_their_line(tmp_path, bad, words):
    """A bad line is an InputError naming the file's line number and the problem."""
    good = json.dumps({"context": "c", "input": "q", "answers": ["a"], "_id": "one"})
    path = write_jsonl(tmp_path / "d.jsonl", good, bad)
    with pytest.raises(InputError) as info:
        read_rows(path)
    assert "d.jsonl:2" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_and_empty_data_files_are_input_errors(tmp_path):
    """A missing file or one without rows is an InputError."""
    with pytest.raises(InputError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no rows"):
        read_rows(write_jsonl(tmp_path / "empty.jsonl", ""))


def test_template_is_split_after_the_context():
    """A template's text up to {context} is the document and its tail the question, both filled."""
    row = Row("1", "DOC", "Who?", ["x"])
    document, question = prompt_parts(row, "Read {context}\n\nQuestion: {input}\nAnswer:")
    assert document == "Read DOC" and question == "Question: Who?\nAnswer:"
    assert prompt_parts(Row("2", "DOC", "", ["x"])) == ("DOC", summary_instruction())
    with pytest.raises(InputError):
        prompt_parts(row, "Question: {input}")
    with pytest.raises(InputError):
        prompt_parts(row, "{input} {context}  ")


# --- needle in a haystack ------------------------------------------------------------------------


def test_insert_needle_goes_to_sentence_boundaries():
    """The needle lands at the start, end, or the sentence boundary nearest the depth."""
    text = "One two. Three four five six! Seven eight? Nine ten eleven twelve."
    assert insert_needle(text, "N.", 0).startswith("N. One")
    assert insert_needle(text, "N.", 1).endswith("twelve. N.")
    middle = insert_needle(text, "N.", 0.5)
    assert "six! N. Seven" in middle


@pytest.fixture(scope="module")
def tokenizer(smollm):
    return smollm.tokenizer


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return prose(tokenizer, 2500)


@pytest.mark.model
def test_niah_rows_hit_lengths_and_depths(tokenizer, haystack):
    """Each row's whole prompt is within 3% of its length, the needle sits at a sentence boundary near its depth."""
    lengths, depths = [400, 1200], [0, 0.25, 0.5, 0.75, 1]
    rows = niah_rows(haystack, NEEDLE, QUESTION, "smoked paprika", lengths, depths, tokenizer)
    assert [r.id for r in rows] == [f"niah-L{n}-d{d:g}" for n in lengths for d in depths]
    for row in rows:
        length, depth = row.niah
        document, question = prompt_parts(row)
        prompt = build_prompt(tokenizer, document, question, max_context=1 << 20)
        assert abs(len(prompt) - length) <= 0.03 * length, (row.id, len(prompt))
        assert row.context.count(NEEDLE) == 1
        at = row.context.index(NEEDLE)
        before, after = row.context[:at], row.context[at + len(NEEDLE):]
        assert before == "" or after == "" or re.search(r"([.!?][\"')\]]*\s+|\n\s*\n)$", before), before[-40:]
        assert after == "" or after.startswith(" ")
        body = before[:-1] if after == "" else before + after[1:]
        nearest = min(abs(s - depth * len(body)) for s in sentence_starts(body))
        assert abs(min(at, len(body)) - depth * len(body)) == nearest  # no boundary lies closer to the depth
        assert abs(at / len(body) - depth) < 0.15


@pytest.mark.model
def test_niah_haystack_too_short_fails_cleanly(tokenizer):
    """A haystack shorter than the longest length is an InputError saying how long it is."""
    with pytest.raises(InputError, match="haystack has"):
        niah_rows("Short text. Only two sentences.", NEEDLE, QUESTION, "paprika", [500], [0.5], tokenizer)


# --- run_eval on a tiny random model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tokenizer):
    """A 4-layer grouped-query Llama with random weights and SmolLM2's tokenizer."""
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
    return Engine(lm)


@pytest.fixture
def counted_captures(monkeypatch):
    """Count calls to capture made by run_eval."""
    calls = []
    real = evaluate.capture

    def wrapper(model, input_ids, *args, **kwargs):
        calls.append((input_ids.shape[1], kwargs.get("accumulated")))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(evaluate, "capture", wrapper)
    return calls


def tiny_rows(haystack: str) -> list[Row]:
    return [
        Row("a", haystack[:600], "What is described?", ["exception"]),
        Row("b", haystack[600:1300], "", ["the statement"]),
    ]


METHODS = ["full", "snapkv", "h2o"]


@pytest.mark.model
def test_run_eval_captures_once_per_row(tiny_engine, haystack, counted_captures, tmp_path):
    """One capture per row serves every method x budget; full runs once; the result has the documented keys."""
    rows = tiny_rows(haystack)
    methods = [make_method(name) for name in METHODS]
    seen = []
    result = run_eval(tiny_engine, rows, methods, [16, 10_000], None, "qa_f1", 3, tmp_path / "log.jsonl", progress=lambda d, t: seen.append((d, t)))
    assert len(counted_captures) == len(rows)
    assert all(accumulated for _, accumulated in counted_captures)  # h2o needs all-query attention
    assert len(result.samples) == len(rows) * (1 + 2 * 2)
    assert seen[-1] == (len(result.samples), len(result.samples))
    for sample in result.samples:
        assert SAMPLE_KEYS <= sample.keys() and 0 <= sample["score"] <= 1
    full = {s["id"]: s["prediction"] for s in result.samples if s["method"] == "full"}
    for sample in result.samples:
        if sample["budget"] == 10_000:  # the prompt fits: the full cache, recorded as such
            assert sample["compressed"] is False and sample["prediction"] == full[sample["id"]]
        elif sample["budget"] == 16:
            assert sample["compressed"] is True
    data = json.loads(json.dumps(result.to_dict()))
    assert {"model", "metric", "summary", "samples"} <= data.keys() and "niah" not in data
    assert [(e["method"], e["budget"]) for e in data["summary"]] == [("full", None), ("snapkv", 16), ("snapkv", 10_000), ("h2o", 16), ("h2o", 10_000)]
    for entry in data["summary"]:
        assert SUMMARY_KEYS <= entry.keys() and entry["n"] == len(rows)
    assert [t["id"] for t in data["timing"]["rows"]] == ["a", "b"]
    assert render(result) is not None


@pytest.mark.model
def test_run_eval_resumes_from_its_log(tiny_engine, haystack, counted_captures, tmp_path):
    """A rerun skips finished combinations: no capture when all are done, only the missing ones after a cut."""
    rows = tiny_rows(haystack)
    methods = [make_method(name) for name in ("full", "streamingllm")]
    out = tmp_path / "log.jsonl"
    first = run_eval(tiny_engine, rows, methods, None, [0.2, 0.5], "contains", 3, out)
    assert len(counted_captures) == 2
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + len(first.samples)  # a header, then one line per sample

    again = run_eval(tiny_engine, rows, methods, None, [0.2, 0.5], "rouge_l", 3, out)
    assert len(counted_captures) == 2  # nothing left to do
    assert [s["prediction"] for s in again.samples] == [s["prediction"] for s in first.samples]
    assert again.metric == "rouge_l"  # stored predictions are rescored with the new metric

    # An interrupted run: row b's last sample is missing and a line was half written.
    out.write_text("\n".join(lines[:-1]) + '\n{"id": "b", "meth')
    resumed = run_eval(tiny_engine, rows, methods, None, [0.2, 0.5], "contains", 3, out)
    assert [n for n, _ in counted_captures[2:]] == [counted_captures[1][0]]  # only row b read again
    assert resumed.samples == first.samples

    with pytest.raises(InputError, match="max_new_tokens"):
        run_eval(tiny_engine, rows, methods, None, [0.2], "contains", 5, out)


def _greedy(engine, state, max_new_tokens: int) -> str:
    tokens = list(decode(engine.model, state, max_new_tokens, engine.eos_ids, Sampling()))
    return engine.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.model
def test_run_eval_modes_answer_as_ask_does(tiny_engine, haystack, counted_captures):
    """reuse and chunked samples equal what `ask --reuse` and `ask --chunk-size` paths answer; one capture per prompt."""
    rows = tiny_rows(haystack)[:1]
    methods = [make_method(name) for name in ("full", "snapkv")]
    result = run_eval(tiny_engine, rows, methods, [16], None, "contains", 4, None, modes=["query", "reuse", "chunked"], chunk_size=32)
    by_mode = {(s["method"], s["mode"]): s for s in result.samples}
    # full once per prompt (query-aware and reused); chunking only applies when compressing
    assert sorted(by_mode) == [("full", "query"), ("full", "reuse"), ("snapkv", "chunked"), ("snapkv", "query"), ("snapkv", "reuse")]
    assert len(counted_captures) == 2  # the query prompt and the reused prefix; chunked prefills on its own
    assert by_mode[("snapkv", "chunked")]["chunk_size"] == 32 and by_mode[("snapkv", "query")]["chunk_size"] is None

    document, question = prompt_parts(rows[0])
    options = Options(budget=16, max_new_tokens=4)
    snapkv = make_method("snapkv")
    # ask --reuse: the prefix compressed once with the generic instruction, the question fed after it
    _, prefix = tiny_engine.compress_prefix(document, snapkv, options)
    assert by_mode[("snapkv", "reuse")]["prediction"] == _greedy(tiny_engine, tiny_engine.answer_after(prefix, question), 4)
    # ask --chunk-size 32: the question probes each chunk
    prompt = tiny_engine.prompt(document, question, options)
    chunked = Options(budget=16, max_new_tokens=4, chunk_size=32)
    state, _ = tiny_engine.read(prompt.ids, snapkv, chunked, probe_ids=prompt.ids[:, prompt.prefix_len :])
    assert len(state.chunks) > 2
    assert by_mode[("snapkv", "chunked")]["prediction"] == _greedy(tiny_engine, state, 4)

    summary = {(e["method"], e["mode"]): e for e in result.summary}
    assert summary[("snapkv", "chunked")]["chunk_size"] == 32
    assert all(e["pct_of_full"] is None or e["pct_of_full"] >= 0 for e in result.summary)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["modes"] == ["query", "reuse", "chunked"] and data["chunk_size"] == 32
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(render(result))
    shown = console.export_text()
    assert "snapkv (reuse)" in shown and "snapkv (chunked 32)" in shown and "full (reuse)" in shown


@pytest.mark.model
def test_run_eval_resumes_each_mode_apart(tiny_engine, haystack, counted_captures, tmp_path):
    """A log holds samples of several modes and chunk sizes; a rerun redoes only those with a new chunk size."""
    rows = tiny_rows(haystack)[:1]
    methods = [make_method(name) for name in ("full", "snapkv")]
    out = tmp_path / "log.jsonl"
    run_eval(tiny_engine, rows, methods, [16], None, "contains", 3, out, modes=["query", "chunked"], chunk_size=32)
    assert len(counted_captures) == 1
    again = run_eval(tiny_engine, rows, methods, [16], None, "contains", 3, out, modes=["chunked", "query"], chunk_size=48)
    assert again.timing["resumed_samples"] == 2  # full and query-aware snapkv; chunked at 48 is new
    assert len(counted_captures) == 1  # chunked prefills on its own, no capture
    assert [(s["mode"], s["chunk_size"]) for s in again.samples if s["method"] == "snapkv"] == [("chunked", 48), ("query", None)]


def test_run_eval_refuses_bad_settings():
    """Budgets and ratios together, no methods, budgets within the window and unknown metrics fail before any work."""
    methods = [make_method("snapkv")]
    with pytest.raises(BudgetError, match="not both"):
        run_eval(None, [], methods, [64], [0.1], "contains", 4, None)
    with pytest.raises(InputError, match="no methods"):
        run_eval(None, [], [], [64], None, "contains", 4, None)
    with pytest.raises(BudgetError, match="window"):
        run_eval(None, [], methods, [8], None, "contains", 4, None)
    with pytest.raises(InputError, match="unknown metric"):
        run_eval(None, [], methods, [64], None, "bleu", 4, None)
    with pytest.raises(InputError, match="unknown mode"):
        run_eval(None, [], methods, [64], None, "contains", 4, None, modes=["query", "batch"])
    with pytest.raises(InputError, match="chunk-size"):
        run_eval(None, [], methods, [64], None, "contains", 4, None, modes=["chunked"], chunk_size=8)


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


@pytest.mark.model
def test_eval_niah_writes_the_documented_json(smollm, model_home, haystack, monkeypatch, tmp_path):
    """A tiny --niah run prints a table on stdout and writes the JSON with summary, samples and a grid per method."""
    monkeypatch.setenv("KVCLI_HOME", str(model_home))
    (tmp_path / "hay.txt").write_text(haystack)
    out = tmp_path / "niah.json"
    result = runner.invoke(app, [
        "eval", "--niah", "--haystack", str(tmp_path / "hay.txt"), "--lengths", "250,350", "--depths", "0,1",
        "--methods", "full,snapkv", "--budgets", "64", "--max-new-tokens", "6", "-m", "smollm2-135m", "--json", str(out),
    ])
    assert result.exit_code == 0, result.stderr
    assert "snapkv" in result.stdout and "needle" in result.stdout
    data = json.loads(out.read_text())
    assert data["model"] == "smollm2-135m" and data["metric"] == "contains"
    assert len(data["samples"]) == 4 * 2
    assert all(SAMPLE_KEYS <= s.keys() and s["score"] in (0.0, 1.0) for s in data["samples"])
    assert [(e["method"], e["budget"]) for e in data["summary"]] == [("full", None), ("snapkv", 64)]
    assert all(SUMMARY_KEYS <= e.keys() and e["n"] == 4 for e in data["summary"])
    assert [(g["method"], g["lengths"], g["depths"]) for g in data["niah"]] == [("full", [250, 350], [0, 1]), ("snapkv", [250, 350], [0, 1])]
    assert all(len(g["scores"]) == 2 and all(len(r) == 2 for r in g["scores"]) for g in data["niah"])
    assert log_path(out).exists()
