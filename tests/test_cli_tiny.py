"""The command line on a tiny random Llama saved in the test: the flags and conventions users meet,
end to end, in milliseconds per run (no embedded model needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app

runner = CliRunner()


def words(n: int, offset: int = 0) -> str:
    return " ".join(f"w{(offset + 7 * i) % 60}" for i in range(n))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A two-layer random Llama folder with 1,024 positions."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024))



@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(words(300))
    return path


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line_error(result, *words: str) -> str:
    """The one `kvcli: error:` line on stderr (exit 2), holding each of `words`."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvcli: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_short_document_with_default_settings_answers(tiny, home, tmp_path):
    """A document whose prompt is shorter than ten windows answers with the default ratio without its floor and says what it kept."""
    note = tmp_path / "note.txt"
    note.write_text(words(30))
    result = run("ask", note, "w1?", "-m", tiny, "--method", "snapkv", "--min-keep", "0", "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    # the document's part of the 8-token window (the question "w1?" and the template's closing are its other 4) and one
    # token more, then the question
    assert stats["compressed"] and stats["retained_per_layer"] == [9, 9]
    assert "no more than the window's 4 tokens before the question: kept 5 per layer and the question's last 4 beside them" in stats["note"]


def test_question_that_is_a_file_is_refused(tiny, home, doc, tmp_path):
    """`kvcli ask a.txt b.txt` refuses to ask the question 'b.txt'."""
    other = tmp_path / "b.txt"
    other.write_text("w1")
    one_line_error(run("ask", doc, other, "-m", tiny), "is a file, not a question")


def test_piped_stdin_needs_no_dash(tiny, home):
    """`cat f | kvcli ask "Q"` reads the piped text as the document."""
    result = run("ask", "w1?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "2", "--json", input=words(100))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] > 100


def test_method_knobs_go_through_param(tiny, home, doc):
    """--param sets a knob the method has; a knob it lacks, and the removed --max-multiple flag, are one-line errors."""
    ok = run("ask", doc, "w1?", "-m", tiny, "--method", "dynamickv", "--param", "max_multiple=3", "--max-new-tokens", "2", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["stats"]["method_params"]["max_multiple"] == 3.0
    one_line_error(run("ask", doc, "w1?", "-m", tiny, "--method", "snapkv", "--param", "max_multiple=3"), "has no knob 'max_multiple'")
    assert run("ask", doc, "w1?", "--max-multiple", "3").exit_code == 2


def test_report_and_json_say_why_the_answer_stopped(tiny, home, doc):
    """The report and --json say the answer stopped at --max-new-tokens (or the end of sequence)."""
    data = run("ask", doc, "w1?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "3", "--json")
    assert json.loads(data.stdout)["stats"]["stopped"] == "max_new_tokens"
    text = run("ask", doc, "w1?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "3")
    assert "3 tokens, stopped at --max-new-tokens" in text.stderr


def test_a_long_question_is_kept_whole_beside_the_budget(tiny, home, doc):
    """ask --budget N with a question longer than the window keeps N tokens per layer of the document and the whole
    question besides (its first words and the window), and the report and --json say how many."""
    question = " ".join(f"w{i}" for i in range(5, 25)) + "?"
    made = run("ask", doc, question, "-m", tiny, "--method", "snapkv", "--budget", "24", "--max-new-tokens", "2", "--json")
    assert made.exit_code == 0, made.stderr
    stats = json.loads(made.stdout)["stats"]
    whole = stats["extra"]["question_kept_whole"]
    assert whole > 10 and stats["retained_per_layer"] == [24 + whole + 8] * len(stats["retained_per_layer"])  # the window: the question's end
    shown = run("ask", doc, question, "-m", tiny, "--method", "snapkv", "--budget", "24", "--max-new-tokens", "2")
    question_tokens = stats["extra"]["question_tokens"]
    assert question_tokens == whole + 8 and stats["retained_per_layer"][0] == 24 + question_tokens
    assert f"the question's {question_tokens} tokens among them, kept whole beside the document's budget" in " ".join(shown.stderr.split())


def test_a_budget_within_the_window_is_refused_whatever_the_question(tiny, home, doc):
    """--budget must be larger than the observation window whether the question fills the window or not."""
    for question in ("w1?", " ".join(f"w{i}" for i in range(5, 25)) + "?"):
        result = run("ask", doc, question, "-m", tiny, "--method", "snapkv", "--budget", "8", "--max-new-tokens", "2")
        assert result.exit_code != 0
        assert "--budget 8 is not larger than the observation window (8 tokens)" in " ".join(result.stderr.split())


def test_first_evidencekv_run_says_it_computes_the_profile(tiny, home, doc):
    """The first evidencekv run on a model without a profile says so on stderr; the second finds it cached."""
    first = run("ask", doc, "w1?", "-m", tiny, "--max-new-tokens", "2")
    assert first.exit_code == 0, first.stderr
    assert "computing the retrieval-head profile" in first.stderr
    assert list((home / "profiles").glob("*.json"))
    second = run("ask", doc, "w1?", "-m", tiny, "--max-new-tokens", "2")
    assert "computing the retrieval-head profile" not in second.stderr


def test_reuse_reports_the_compression_peak(tiny, home, doc):
    """--reuse reports the KV peak of compressing the prefix, not just the bytes kept, and warns it is question-agnostic."""
    result = run("ask", doc, "w1?", "-m", tiny, "--method", "snapkv", "--reuse", "--ratio", "0.2", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["read"] == "reused"
    assert stats["kv_bytes_peak"] > stats["kv_bytes_kept"]
    assert "question-agnostic" in result.stderr or "without the questions" in result.stderr


def test_environment_picks_the_method(tiny, home, doc, monkeypatch):
    """KVCLI_METHOD sets the default --method."""
    monkeypatch.setenv("KVCLI_METHOD", "h2o")
    result = run("ask", doc, "w1?", "-m", tiny, "--max-new-tokens", "2", "--json")
    assert json.loads(result.stdout)["stats"]["method"] == "h2o"


def test_compare_answers_from_both_caches(tiny, home, doc):
    """--compare answers from the compressed and the full cache of one prefill and says whether they agree."""
    result = run("ask", doc, "w1?", "-m", tiny, "--method", "snapkv", "--ratio", "0.1", "--max-new-tokens", "3", "--compare", "--json")
    data = json.loads(result.stdout)
    assert isinstance(data["full_cache_answer"], str) and data["same_answer"] == (data["full_cache_answer"] == data["answer"])
    text = run("ask", doc, "w1?", "-m", tiny, "--method", "snapkv", "--ratio", "0.1", "--max-new-tokens", "3", "--compare")
    assert "full cache answered:" in text.stderr and re.search(r"kept 1\d\.\d%", text.stderr)  # 10% of the document, and the question


def test_inspect_layers_can_be_turned_off(tiny, home, doc):
    """`inspect --no-layers` prints the report without the per-layer retention profile; --layers adds it."""
    off = run("inspect", doc, "-m", tiny, "--method", "snapkv", "--no-layers")
    on = run("inspect", doc, "-m", tiny, "--method", "snapkv", "--layers")
    assert off.exit_code == on.exit_code == 0, off.stderr
    assert "kept share by" in on.stdout and "kept share by" not in off.stdout
    assert "profile" not in json.loads(run("inspect", doc, "-m", tiny, "--method", "snapkv", "--no-layers", "--json").stdout)


def test_include_and_exclude_reach_the_reader(tiny, home, tmp_path):
    """--include/--exclude pick which files of a folder are read."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.py").write_text(words(40))
    (folder / "b.md").write_text(words(40, 3))
    both = json.loads(run("inspect", folder, "-m", tiny, "--method", "snapkv", "--json").stdout)["stats"]["prompt_tokens"]
    only = json.loads(run("inspect", folder, "-m", tiny, "--method", "snapkv", "--include", "*.py", "--json").stdout)["stats"]["prompt_tokens"]
    excluded = json.loads(run("inspect", folder, "-m", tiny, "--method", "snapkv", "--exclude", "*.md", "--json").stdout)["stats"]["prompt_tokens"]
    assert only == excluded < both


def test_models_lists_the_embedded_models(home):
    """`kvcli models --json` lists every embedded model with whether it is installed."""
    from kvcli.models import EMBEDDED

    rows = json.loads(run("models", "--json").stdout)
    assert [r["name"] for r in rows if r["kind"] == "embedded"] == list(EMBEDDED)
    assert all(isinstance(r["installed"], bool) for r in rows)


def test_several_questions_read_the_document_once(tiny, home, doc):
    """`ask -q A -q B` reads the document once and answers each as a one-pass `ask` of that question does."""
    args = ["-m", tiny, "--method", "snapkv", "--ratio", "0.2", "--max-new-tokens", "4", "--json"]
    both = run("ask", doc, "-q", "w1 w2?", "-q", "w30?", *args)
    assert both.exit_code == 0, both.stderr
    rows = [json.loads(line) for line in both.stdout.splitlines()]
    assert [r["stats"]["read"] for r in rows] == ["once", "once"]
    assert rows[0]["stats"]["extra"]["prefix"]["seconds"] > 0 and rows[1]["stats"]["extra"]["prefix"]["seconds"] == 0
    # the first question paid for reading the prefix: its time to the first token counts it
    assert rows[0]["stats"]["ttft_s"] >= rows[0]["stats"]["prefill_s"] >= rows[0]["stats"]["extra"]["prefix"]["seconds"]
    for row in rows:
        alone = json.loads(run("ask", doc, row["question"], *args).stdout)
        assert row["answer"] == alone["answer"]
        assert row["stats"]["retained_per_layer"] == alone["stats"]["retained_per_layer"]
        assert row["stats"]["prompt_tokens"] == alone["stats"]["prompt_tokens"]


def test_a_saved_full_prefix_answers_query_aware(tiny, home, doc, tmp_path):
    """`kvcli read` saves the full prefix; `ask --cache` then compresses each question with the ask-time method and
    ratio, keeping and answering what a one-pass `ask` does; bfloat16 storage halves the file."""
    full = tmp_path / "doc.kvc"
    made = run("read", doc, "-o", full, "-m", tiny, "--json")
    assert made.exit_code == 0, made.stderr
    assert json.loads(made.stdout)["kind"] == "full"
    args = ["-m", tiny, "--method", "dynamickv", "--ratio", "0.2", "--max-new-tokens", "4", "--json"]
    saved = [json.loads(line) for line in run("ask", "--cache", full, "-q", "w1 w2?", "-q", "w30?", *args).stdout.splitlines()]
    for row in saved:
        alone = json.loads(run("ask", doc, row["question"], *args).stdout)
        assert row["stats"]["read"] == "once" and row["stats"]["method"] == "dynamickv"
        assert row["answer"] == alone["answer"]
        assert row["stats"]["retained_per_layer"] == alone["stats"]["retained_per_layer"]
    half = tmp_path / "half.kvc"
    assert run("read", doc, "-o", half, "-m", tiny, "--save-dtype", "bfloat16").exit_code == 0
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert run("ask", "--cache", half, "w1?", *args).exit_code == 0


def test_a_saved_full_prefix_says_what_it_cannot_answer(tiny, home, doc, tmp_path):
    """h2o on a full prefix saved without all-query scores, and a wider --window than it was read for, are one-line errors."""
    full = tmp_path / "doc.kvc"
    assert run("read", doc, "-o", full, "-m", tiny).exit_code == 0
    one_line_error(run("ask", "--cache", full, "w1?", "-m", tiny, "--method", "h2o", "--max-new-tokens", "2"), "--all-query-scores")
    one_line_error(run("ask", "--cache", full, "w1?", "-m", tiny, "--method", "snapkv", "--window", "100", "--max-new-tokens", "2"), "read again")
    scored = tmp_path / "scored.kvc"
    assert run("read", doc, "-o", scored, "-m", tiny, "--all-query-scores").exit_code == 0
    assert run("ask", "--cache", scored, "w1?", "-m", tiny, "--method", "h2o", "--max-new-tokens", "2").exit_code == 0


def test_read_once_on_a_document_cut_to_fit_reads_it_once(tiny, home, tmp_path):
    """With --cut-middle, several questions about a document longer than the context read its cut prefix once, with room for the longest question."""
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(words(3000))
    result = run("ask", long_doc, "-q", "w1?", "-q", "w2 w3 w4 w5 w6 w7 w8 w9?", "-m", tiny, "--method", "snapkv",
                 "--max-new-tokens", "4", "--max-context", "600", "--cut-middle", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["stats"]["read"] == "once" and r["stats"]["dropped_tokens"] > 0 for r in rows)
    assert all(r["stats"]["prompt_tokens"] + 4 <= 600 for r in rows)
    assert rows[1]["stats"]["extra"]["prefix"]["seconds"] == 0


def test_a_document_past_the_context_is_read_whole_by_default(tiny, home, tmp_path):
    """A document 4x --max-context is read whole in chunks with re-indexed positions (the report says so); --method full
    and a budget that cannot fit are refused in one line; --cut-middle still cuts."""
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(words(2400))
    args = ["-m", tiny, "--method", "snapkv", "--budget", "64", "--max-new-tokens", "4", "--max-context", "600"]
    data = json.loads(run("ask", long_doc, "w1?", *args, "--json").stdout)
    stats = data["stats"]
    assert stats["read"] == "reindexed" and stats["dropped_tokens"] == 0 and stats["prompt_tokens"] > 2400
    past = stats["extra"]["past_window"]
    assert past["positions"] == 600 and past["chunks"] >= 4
    assert stats["retained_per_layer"] == [64 + 4, 64 + 4]  # the document's 64 and the question, kept whole
    text = run("ask", long_doc, "w1?", *args)
    flat = " ".join(text.stderr.split())  # the report's table wraps its lines
    assert "positions re-indexed" in flat and "x the 600-position context" in flat
    assert "past the context" in flat and "model's positions" not in flat  # --max-context's, not the model's
    several = [json.loads(line) for line in run("ask", long_doc, "-q", "w1?", "-q", "w2?", *args, "--json").stdout.splitlines()]
    assert [r["stats"]["read"] for r in several] == ["reindexed", "reindexed"]
    one_line_error(run("ask", long_doc, "w1?", *args[:2], "--method", "full", "--max-context", "600"), "--method full", "--cut-middle")
    one_line_error(run("ask", long_doc, "w1?", *args[:2], "--method", "snapkv", "--ratio", "0.5", "--max-context", "600"), "lower --ratio")
    cut = json.loads(run("ask", long_doc, "w1?", *args, "--cut-middle", "--json").stdout)["stats"]
    assert cut["read"] == "query" and cut["dropped_tokens"] > 0


def test_eval_reads_rows_past_the_context_as_ask_does(tiny, home, tmp_path):
    """`kvcli eval` reads a row longer than --max-context whole (re-indexed), predicting what `kvcli ask` prints;
    with --methods full it names the row and --cut-middle in one line."""
    context = words(2000)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"_id": "long", "context": context, "input": "w1?", "answers": ["w3"]}) + "\n")
    (tmp_path / "doc.txt").write_text(context)
    out = tmp_path / "out.json"
    common = ["-m", tiny, "--max-new-tokens", "4", "--max-context", "600"]
    result = run("eval", "--data", data, "--methods", "snapkv", "--budgets", "64", "-o", out, *common)
    assert result.exit_code == 0, result.stderr
    prediction = json.loads(out.read_text())["samples"][0]["prediction"]
    asked = json.loads(run("ask", tmp_path / "doc.txt", "w1?", "--method", "snapkv", "--budget", "64", "--json", *common).stdout)
    assert asked["stats"]["read"] == "reindexed" and prediction == asked["answer"]
    one_line_error(run("eval", "--data", data, "--methods", "full", "--budgets", "64", *common), "row long", "--cut-middle")


def test_a_saved_compressed_cache_past_the_context(tiny, home, tmp_path):
    """`compress` reads a document 4x --max-context whole (chunks, the instruction probing each, positions re-indexed),
    saves where RoPE left off, and `ask --cache` answers with every position inside the context."""
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(words(2400))
    kvc = tmp_path / "long.kvc"
    common = ["-m", tiny, "--max-context", "600"]
    made = run("compress", long_doc, "-o", kvc, "--method", "snapkv", "--budget", "64", "--json", *common)
    assert made.exit_code == 0, made.stderr
    stats = json.loads(made.stdout)["stats"]
    assert stats["extra"]["past_window"]["chunks"] >= 4 and stats["extra"]["scorer"] == "instruction"
    assert stats["retained_per_layer"] == [64, 64]
    from safetensors import safe_open

    with safe_open(str(kvc), "pt") as handle:
        meta = json.loads(handle.metadata()["kvcli"])
        ropes = [handle.get_tensor(f"layer.{i}.rope") for i in range(2)]
    assert 64 <= meta["next_position"] < 600 and all(int(r.max()) < meta["next_position"] for r in ropes)
    asked = run("ask", "--cache", kvc, "w1?", "--max-new-tokens", "4", "--json", *common)
    assert asked.exit_code == 0, asked.stderr
    assert json.loads(asked.stdout)["stats"]["read"] == "saved"


def test_summarize_past_the_context_by_sections_or_compressed(tiny, home, tmp_path):
    """summarize on a document 4x --max-context summarizes every section, then their summaries, by default (the report
    says how many); --past compressed reads it whole re-indexed; a document that fits is read in one pass either way."""
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(words(2400))
    args = ["-m", tiny, "--method", "snapkv", "--budget", "64", "--max-new-tokens", "8", "--max-context", "600"]
    stats = json.loads(run("summarize", long_doc, *args, "--past", "sections", "--json").stdout)["stats"]
    past = stats["extra"]["past_window"]
    assert stats["read"] == "sections" and past["strategy"] == "sections" and past["positions"] == 600
    assert past["sections"] == -(-2400 // past["section_tokens"]) and past["rounds"] == 1
    assert stats["prompt_tokens"] < 600  # the final read holds the summaries, not the document
    # the sections were compressed with snapkv; the summaries, already a digest, are read whole
    assert past["section_method"] == "snapkv" and past["summaries_read"] == "whole"
    assert stats["method"] == "full" and stats["ratio"] == 1.0
    text = run("summarize", long_doc, *args, "--past", "sections")
    flat = " ".join(text.stderr.split())  # the report's table wraps its lines
    assert text.exit_code == 0 and f"{past['sections']} sections of up to" in flat
    assert "summarized with snapkv" in flat and "then their summaries read whole" in flat and "past the context" in flat
    # at a ratio, each section keeps what one compressed read of the whole document would: the ratio of the document
    by_ratio = json.loads(run("summarize", long_doc, *args[:4], "--ratio", "0.1", *args[6:], "--past", "sections", "--json").stdout)
    kept = by_ratio["stats"]["extra"]["past_window"]
    per_layer = int(kept["section_budget"].split()[1])
    # of the document before the instruction, which that read keeps whole beside (as each section keeps its own)
    fits = tmp_path / "fits.txt"
    fits.write_text(words(100))
    instruction = json.loads(run("summarize", fits, *args[:4], "--ratio", "0.1", *args[6:], "--json").stdout)["stats"]["extra"]["question_tokens"]
    assert instruction > 5
    assert abs(per_layer - 0.1 * (kept["prompt_tokens"] - instruction)) <= 1
    assert kept["section_budget"].endswith("a section (ratio 0.1 of the whole document)")
    assert json.loads(run("summarize", long_doc, *args, "--json").stdout)["stats"]["read"] == "sections"  # the default
    compressed = json.loads(run("summarize", long_doc, *args, "--past", "compressed", "--json").stdout)["stats"]
    assert compressed["read"] == "reindexed" and compressed["extra"]["past_window"]["chunks"] >= 4
    short = json.loads(run("summarize", tmp_path / "short.txt" if (tmp_path / "short.txt").write_text(words(100)) else None, *args, "--json").stdout)["stats"]
    assert short["read"] == "query"
    one_line_error(run("summarize", long_doc, *args, "--past", "map"), "--past must be sections or compressed")


def test_compare_past_the_context_never_passes_the_positions(tiny, home, tmp_path, monkeypatch):
    """`ask --compare` on a document 2x the model's positions: no position fed reaches max_position_embeddings, its
    compressed answer is plain `ask`'s, and its full cache is said to be of the documents cut to fit."""
    import kvcli.models

    long_doc = tmp_path / "long.txt"
    long_doc.write_text(words(2100))
    fed = []
    load = kvcli.models.load_model

    def load_and_watch(*args, **kwargs):
        lm = load(*args, **kwargs)
        lm.model.register_forward_pre_hook(lambda module, a, kw: fed.append(int(kw["position_ids"].max())), with_kwargs=True)
        return lm

    monkeypatch.setattr(kvcli.models, "load_model", load_and_watch)
    args = [long_doc, "w1?", "-m", tiny, "--method", "snapkv", "--budget", "96", "--max-new-tokens", "3", "--json"]
    plain = run("ask", *args)
    compared = run("ask", *args, "--compare")
    assert plain.exit_code == compared.exit_code == 0, compared.stderr
    assert fed and max(fed) < 1024
    data = json.loads(compared.stdout)
    assert data["answer"] == json.loads(plain.stdout)["answer"] and data["stats"]["read"] == "reindexed"
    assert "cut in the middle" in data["full_cache_read"]
    text = run("ask", *args[:-1], "--compare")
    assert "full cache of the documents cut in the middle" in text.stderr


def test_several_questions_are_labelled_blocks_with_one_report(tiny, home, doc):
    """`ask -q Q1 -q Q2`: stdout holds one `Q: ...`/`A: ...` block per question, blank-line separated (docs/cli.md);
    stderr one short line per answer and one report; --json stays one object per answer."""
    args = [doc, "-q", "w1?", "-q", "w2 w3?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "3"]
    result = run("ask", *args)
    assert result.exit_code == 0, result.stderr
    blocks = result.stdout.rstrip("\n").split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == ["Q: w1?", "Q: w2 w3?"]
    answers = [json.loads(line)["answer"] for line in run("ask", *args, "--json").stdout.splitlines()]
    assert [block.split("\nA: ", 1)[1].strip() for block in blocks] == answers
    assert result.stderr.count("KV cache  ") <= 1 and result.stderr.count("model ") == 1  # one report
    assert [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("Q")] == ["Q1", "Q2"]
    assert all("stopped at" in line for line in result.stderr.splitlines() if line.startswith("Q"))


def test_several_questions_on_a_terminal_label_each_answer(tiny, home, doc, tmp_path):
    """On a real pseudo-terminal, `ask -q Q1 -q Q2` shows each answer after its question."""
    import os
    import sys

    import pexpect

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVCLI_") or k == "KVCLI_CPU_BF16"}, "KVCLI_HOME": str(home), "OMP_NUM_THREADS": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "kvcli", "ask", str(doc), "-q", "w1?", "-q", "w2 w3?", "-m", tiny,
                                           "--method", "snapkv", "--max-new-tokens", "3"],
                          env=env, encoding="utf-8", dimensions=(24, 200), timeout=120)
    child.expect_exact("Q: w1?")
    child.expect_exact("A: ")
    child.expect(r"Q1: \(snapkv")
    child.expect_exact("Q: w2 w3?")
    child.expect_exact("A: ")
    child.expect(r"Q2: \(snapkv")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_read_leaves_the_run_options_it_is_given_as_they_were(tiny, home, doc, tmp_path):
    """`kvcli read` reads with its own settings (method full, its --max-context and --system) without changing the
    RunOptions handed to it."""
    from kvcli.cli.options import RunOptions
    from kvcli.cli.read import read

    run_options = RunOptions(model=tiny, method="snapkv", max_context=900, system="be brief", quiet=True)
    before = repr(run_options)
    read.__wrapped__.__wrapped__([str(doc)], str(tmp_path / "doc.kvc"), save_dtype="auto", all_query_scores=False,
                                 max_context=None, system=None, run=run_options)
    assert (tmp_path / "doc.kvc").exists() and repr(run_options) == before


def test_a_per_head_split_is_saved_reused_and_reported(tiny, home, doc, tmp_path):
    """`compress --param head_split=global` saves heads of unequal lengths; `ask --cache` answers from them and
    reports how uneven they are; `inspect --layers --plot` draws the split cache."""
    kvc = tmp_path / "doc.kvc"
    made = run("compress", doc, "-o", kvc, "-m", tiny, "--method", "snapkv", "--ratio", "0.2", "--param", "head_split=global", "--json")
    assert made.exit_code == 0, made.stderr
    stats = json.loads(made.stdout)["stats"]
    heads = stats["extra"]["heads"]
    assert heads["min"] < heads["max"] and stats["method_params"]["head_split"] == "global"
    assert sum(map(sum, heads["per_layer"])) == round(0.2 * stats["prompt_tokens"] * 2) * 2  # the budget's mean over layers and heads
    # no sliding-window layers: the global layers' budget and ratio are the whole cache's, exact (not of rounded layer means)
    assert stats["global_budget"] == pytest.approx(stats["budget"]) and stats["global_ratio"] == pytest.approx(stats["ratio"])
    asked = run("ask", "--cache", kvc, "w1?", "-m", tiny, "--max-new-tokens", "3", "--json")
    assert asked.exit_code == 0, asked.stderr
    answered = json.loads(asked.stdout)["stats"]
    grown = answered["extra"]["heads"]
    assert answered["read"] == "saved" and grown["min"] - heads["min"] == grown["max"] - heads["max"] > 0  # the question, in every head
    shown = run("ask", "--cache", kvc, "w1?", "-m", tiny, "--max-new-tokens", "3")
    assert "KV heads kept" in shown.stderr
    pytest.importorskip("matplotlib")
    picture = tmp_path / "split.png"
    drawn = run("inspect", doc, "-m", tiny, "--method", "snapkv", "--param", "head_split=adaptive", "--ratio", "0.2",
                "--layers", "--plot", picture)
    assert drawn.exit_code == 0, drawn.stderr
    assert picture.stat().st_size > 0
    saved_picture = tmp_path / "saved.png"
    drawn = run("inspect", kvc, "--plot", saved_picture)  # the saved cache itself, without a model
    assert drawn.exit_code == 0, drawn.stderr
    assert saved_picture.stat().st_size > 0


def test_the_profile_split_sizes_heads_by_the_retrieval_profile(tiny, home, doc, tmp_path):
    """`--param head_split=profile` (HeadKV's budgets): a query-aware evidencekv read and a saved snapkv cache keep
    the budget's entries over heads of unequal lengths, sized by the model's profile (computed once, as evidencekv's)."""
    import torch

    from kvcli.profile import RetrievalProfile, profile_path

    asked = run("ask", doc, "w1?", "-m", tiny, "--method", "evidencekv", "--budget", "24", "--param", "head_split=profile",
                "--max-new-tokens", "2", "--json")
    assert asked.exit_code == 0, asked.stderr
    stats = json.loads(asked.stdout)["stats"]
    heads = stats["extra"]["heads"]
    assert heads["min"] < heads["max"] and stats["method_params"]["head_split"] == "profile"
    profile = RetrievalProfile.from_json(next(profile_path("", "x").parent.glob("*.json")).read_text())
    weights = torch.tensor(profile.scores).view(len(heads["per_layer"]), 2, -1).amax(dim=-1).flatten()  # a KV head's best query head
    kept = torch.tensor(heads["per_layer"]).flatten()
    higher = weights[:, None] > weights[None, :]
    assert (kept[:, None] >= kept[None, :])[higher].all()  # a head the profile ranks higher keeps at least as many
    kvc = tmp_path / "profile.kvc"
    made = run("compress", doc, "-o", kvc, "-m", tiny, "--method", "snapkv", "--ratio", "0.2", "--param", "head_split=profile", "--json")
    assert made.exit_code == 0, made.stderr
    saved = json.loads(made.stdout)["stats"]
    assert saved["extra"]["heads"]["min"] < saved["extra"]["heads"]["max"]
    assert sum(map(sum, saved["extra"]["heads"]["per_layer"])) == round(0.2 * saved["prompt_tokens"] * 2) * 2


def test_inspect_shows_a_saved_cache_without_loading_a_model(tiny, home, doc, tmp_path, monkeypatch):
    """`kvcli inspect FILE.kvc` reads the file alone: what was kept per layer and KV head, the bytes
    against the full cache, where in the document, as `compress` reported it; no model loads (the
    session's start, which loads one, is made to fail), and flags that would change the read are
    said to be ignored."""
    import kvcli.cli.session

    kvc = tmp_path / "doc.kvc"
    made = run("compress", doc, "-o", kvc, "-m", tiny, "--method", "snapkv", "--ratio", "0.2", "--param", "head_split=global", "--json")
    assert made.exit_code == 0, made.stderr
    compressed = json.loads(made.stdout)["stats"]

    def no_model(*args, **kwargs):
        raise AssertionError("inspect FILE.kvc loaded a model")

    monkeypatch.setattr(kvcli.cli.session, "start", no_model)
    shown = run("inspect", kvc, "--json")
    assert shown.exit_code == 0, (shown.stderr, shown.exception)
    data = json.loads(shown.stdout)
    stats = data["stats"]
    for key in ("method", "method_params", "prompt_tokens", "kv_bytes_kept", "kv_bytes_full", "retained_per_layer"):
        assert stats[key] == compressed[key], key
    assert stats["extra"]["heads"] == compressed["extra"]["heads"] and stats["ratio"] == pytest.approx(compressed["ratio"])
    assert stats["read"] == "saved" and stats["extra"]["file"]["kind"] == "compressed"
    assert stats["extra"]["file"]["bytes"] == kvc.stat().st_size and stats["extra"]["file"]["windows_recorded"]
    groups = data["profile"]["groups"]
    assert [g["label"] for g in groups][-1] == "prompt (template, instruction)"
    assert sum(g["prompt_tokens"] for g in groups) == compressed["prompt_tokens"]
    per_layer = data["profile"]["kept_per_layer_per_group"]
    for kept, heads in zip(per_layer, compressed["extra"]["heads"]["per_layer"]):
        assert sum(kept) == pytest.approx(sum(heads) / len(heads), abs=0.05)  # every kept entry is a prompt token, per head
    text = run("inspect", kvc, "-q", "w1?", "--ratio", "0.5")
    assert text.exit_code == 0, text.stderr
    assert "kvcli compress" in text.stdout and "KV heads kept" in text.stdout and "kept share by" in text.stdout
    assert "--question, --ratio ignored" in text.stderr
    one_line_error(run("inspect", kvc, doc), "inspect a saved cache alone")
    one_line_error(run("inspect", "a" * 300 + ".kvc"), "does not exist")  # a name longer than the system looks up
    one_line_error(run("ask", "--cache", "a" * 300 + ".kvc", "w1?", "-m", tiny), "does not exist")
    kvc.write_bytes(kvc.read_bytes()[:-10])
    one_line_error(run("inspect", kvc), "truncated", "compress the documents again")


def test_inspect_shows_a_saved_full_prefix(tiny, home, doc, tmp_path):
    """A full prefix (`kvcli read`) is shown as every token kept, not compressed."""
    kvc = tmp_path / "full.kvc"
    assert run("read", doc, "-o", kvc, "-m", tiny).exit_code == 0
    shown = run("inspect", kvc, "--no-layers", "--json")
    assert shown.exit_code == 0, shown.stderr
    stats = json.loads(shown.stdout)["stats"]
    assert stats["method"] == "full" and not stats["compressed"] and stats["extra"]["file"]["kind"] == "full"
    assert stats["kv_bytes_kept"] == stats["kv_bytes_full"] and stats["ratio"] == pytest.approx(1.0)
    assert "profile" not in json.loads(shown.stdout)
    profiled = run("inspect", kvc)  # every token kept: no profile to show, and it says so
    assert profiled.exit_code == 0 and "kept share by" not in profiled.stdout and "keeps every token" in profiled.stderr


def test_question_agnostic_reads_default_to_the_measured_method(tiny, home, doc, tmp_path, monkeypatch):
    """Without --method, `ask --reuse` and `compress` rank by the repeat with AGNOSTIC_METHOD and its knobs
    (the user's --param over them); a method the user names, even the default's, or sets in KVCLI_METHOD,
    is kept, and so is the default method for query-aware reads, the instruction scorer and a document
    past the positions (the instruction probes its chunks)."""
    from kvcli.defaults import AGNOSTIC_METHOD, AGNOSTIC_PARAMS, DEFAULT_METHOD

    def stats(*args):
        result = run("ask", doc, "w1?", "-m", tiny, "--ratio", "0.2", "--max-new-tokens", "2", "--json", *args)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["stats"]

    knobs = dict(item.split("=") for item in AGNOSTIC_PARAMS)
    reused = stats("--reuse")
    assert reused["method"] == AGNOSTIC_METHOD and reused["extra"]["scorer"] == "repeat"
    assert {key: reused["method_params"][key] for key in knobs} == {"head_split": "adaptive", "head_floor": 0.2, "kernel_size": 1, "rescore": 2,
                                                                    "surprisal": 0.35}
    assert reused["extra"]["repeats"] == 2 and reused["extra"]["rescore_s"] > 0  # the second repeat, over twice the budget, ran
    assert reused["extra"]["surprisal"] == 0.35 and "surprisal_s" in reused["extra"]  # the first repeat's scores were weighed
    assert "repeats" not in stats("--reuse", "--param", "rescore=0")["extra"]
    assert "surprisal" not in stats("--reuse", "--param", "surprisal=0")["extra"]
    assert stats("--method", "dynamickv", "--param", "surprisal=0.5")["note"].count("surprisal=0.5 acts only on a cache the repeat scorer ranks") == 1
    assert stats("--method", "dynamickv", "--param", "rescore=2")["note"].count("rescore=2 acts only on a cache the repeat scorer ranks") == 1
    assert stats("--reuse", "--param", "head_floor=0.5")["method_params"]["head_floor"] == 0.5
    one_line_error(run("ask", doc, "w1?", "-m", tiny, "--reuse", "--param", "shared_fraction=0.5"), "shared_fraction", "--method")
    assert stats("--reuse", "--method", "evidencekv", "--param", "shared_fraction=0.5")["method"] == "evidencekv"
    assert stats("--reuse", "--scorer", "instruction", "--param", "shared_fraction=0.5")["method"] == DEFAULT_METHOD
    assert stats("--reuse", "--method", DEFAULT_METHOD)["method"] == DEFAULT_METHOD
    assert stats("--reuse", "--scorer", "instruction")["method"] == DEFAULT_METHOD
    assert stats()["method"] == DEFAULT_METHOD
    monkeypatch.setenv("KVCLI_METHOD", "snapkv")
    assert stats("--reuse")["method"] == "snapkv"
    monkeypatch.delenv("KVCLI_METHOD")
    kvc = tmp_path / "doc.kvc"
    made = run("compress", doc, "-o", kvc, "-m", tiny, "--ratio", "0.2", "--json")
    assert made.exit_code == 0, made.stderr
    assert json.loads(made.stdout)["stats"]["method"] == AGNOSTIC_METHOD and json.loads(made.stdout)["stats"]["extra"]["repeats"] == 2
    # --param is checked against the method that reads with it: the agnostic default's own knobs are taken (the
    # query-aware default lacks them), and a split it cannot make is refused in its name
    assert stats("--reuse", "--param", "max_multiple=5")["method_params"]["max_multiple"] == 5
    made = run("compress", doc, "-o", kvc, "-m", tiny, "--ratio", "0.2", "--param", "max_multiple=5", "--json")
    assert made.exit_code == 0, made.stderr
    assert json.loads(made.stdout)["stats"]["method_params"]["max_multiple"] == 5
    # the equal split the user asks for drops the default's floor (which acts only on a split) instead of a note on it
    equal = stats("--reuse", "--param", "head_split=equal")
    assert equal["method_params"]["head_floor"] == 0.0 and "head_floor" not in equal["note"]
    idle = stats("--method", "snapkv", "--param", "head_floor=0.5")["note"]  # a floor the equal split never uses: said once
    assert idle.count("head_floor=0.5 acts only with head_split=adaptive, global or profile") == 1
    for command in (["compress", doc, "-o", kvc], ["ask", doc, "w1?", "--reuse"]):
        one_line_error(run(*command, "-m", tiny, "--param", "head_split=global"), f"{AGNOSTIC_METHOD} splits heads", "--method")
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(words(2400))
    past = run("compress", long_doc, "-o", kvc, "-m", tiny, "--max-context", "600", "--budget", "64", "--json")
    assert past.exit_code == 0, past.stderr
    stats = json.loads(past.stdout)["stats"]
    assert stats["method"] == DEFAULT_METHOD and stats["extra"]["scorer"] == "instruction"
