"""The --min-keep floor: the default ratio keeps at least that many tokens per layer, so short and
mid-size documents answer as the full cache does, while explicit budgets do what they say."""

from __future__ import annotations

import json

import pytest
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app
from kvcli.errors import BudgetError
from kvcli.methods import DEFAULT_MIN_KEEP, DEFAULT_RATIO, Budget

LAYERS, WINDOW = 24, 8
runner = CliRunner()


def kept(budget: Budget, prompt_len: int) -> tuple[float | None, str]:
    """Mean tokens kept per layer (None: every token) and the note."""
    plan, note = budget.plan(prompt_len, LAYERS, WINDOW)
    return (None if plan is None else plan.average), note


@pytest.mark.parametrize("prompt_len", [62, 300, DEFAULT_MIN_KEEP, 2000, 6000])
def test_default_keeps_the_floor_or_the_whole_prompt(prompt_len):
    """Under the default ratio a prompt keeps min(--min-keep, prompt) tokens per layer, and the note says why."""
    average, note = kept(Budget(), prompt_len)
    if prompt_len <= DEFAULT_MIN_KEEP:
        assert average is None and note == f"kept all {prompt_len} tokens: below --min-keep {DEFAULT_MIN_KEEP}"
    else:
        assert average == DEFAULT_MIN_KEEP and "--min-keep" in note


@pytest.mark.parametrize("prompt_len", [16_384, 40_000])
def test_long_prompts_still_compress_to_the_ratio(prompt_len):
    """From 16K tokens on the default keeps the ratio it states: the floor no longer binds."""
    average, note = kept(Budget(), prompt_len)
    assert average == pytest.approx(DEFAULT_RATIO * prompt_len, abs=1) and note == ""


def test_explicit_ratio_and_budget_below_the_floor_are_obeyed_with_a_note():
    """An explicit --ratio or --budget below the floor keeps what it asks, and one line says the floor was not applied."""
    average, note = kept(Budget(ratio=0.05), 4000)
    assert average == 200 and "--min-keep" in note and "\n" not in note
    average, note = kept(Budget(tokens=256), 4000)
    assert average == 256 and "--min-keep" in note and "\n" not in note
    assert kept(Budget(ratio=0.5), 4000) == (2000, "")  # above the floor: nothing to say


def test_min_keep_given_floors_an_explicit_ratio_and_zero_turns_it_off():
    """--min-keep with --ratio floors that ratio; --min-keep 0 keeps the bare ratio (the window's rule still holds)."""
    assert kept(Budget(ratio=0.05, min_keep=512), 4000)[0] == 512
    assert kept(Budget(min_keep=0), 4000) == (400, "")
    average, note = kept(Budget(min_keep=0), 62)
    assert average == WINDOW + 1 and "window" in note
    with pytest.raises(BudgetError, match="--min-keep"):
        Budget(min_keep=-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A two-layer random Llama folder with 1,024 positions."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024))


def words(n: int) -> str:
    return " ".join(f"w{(7 * i) % 60}" for i in range(n))


def ask(*args) -> dict:
    result = runner.invoke(app, ["ask", *[str(a) for a in args], "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.splitlines()[0])["stats"]  # the first question's


@pytest.mark.parametrize("method", ["snapkv", "evidencekv"])
def test_json_and_report_show_the_floor(tiny, home, tmp_path, method):
    """`ask --json` and the report say that a short prompt was kept whole below --min-keep, and --min-keep N sets the floor."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(300))
    stats = ask(doc, "w1?", "-m", tiny, "--method", method)
    assert not stats["compressed"] and f"below --min-keep {DEFAULT_MIN_KEEP}" in stats["note"]
    floored = ask(doc, "w1?", "-m", tiny, "--method", method, "--min-keep", "100")
    assert floored["compressed"] and sum(floored["retained_per_layer"]) == 2 * (100 + 4) and "--min-keep" in floored["note"]
    bare = ask(doc, "w1?", "-m", tiny, "--method", method, "--min-keep", "0")
    # the default ratio of the document (the prompt less the 4-token question), and the question kept whole
    assert sum(bare["retained_per_layer"]) == round(DEFAULT_RATIO * (bare["prompt_tokens"] - 4) * 2) + 2 * 4
    report = runner.invoke(app, ["ask", str(doc), "w1?", "-m", tiny, "--method", method, "--max-new-tokens", "2"])
    assert report.exit_code == 0 and f"below --min-keep {DEFAULT_MIN_KEEP}" in " ".join(report.stderr.split())


@pytest.mark.parametrize("mode", [["--chunk-size", "64"], ["--reuse"], ["-q", "w2?"]])
def test_floor_holds_for_chunked_and_read_once(tiny, home, tmp_path, mode):
    """Chunked reads and a document read once (for several questions, or reused) keep the floor as a plain read does
    (a reused prefix keeps it, then holds the question after it)."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(300))
    stats = ask(doc, "-q", "w1?", *mode, "-m", tiny, "--method", "snapkv", "--min-keep", "100")
    assert stats["compressed"] and all(100 <= n < 100 + 8 for n in stats["retained_per_layer"])


def test_past_the_context_leaves_room_for_chunks(tiny, home, tmp_path):
    """A document past --max-context is still read whole at the default: the floor gives way to half the free positions."""
    doc = tmp_path / "long.txt"
    doc.write_text(words(2400))
    stats = ask(doc, "w1?", "-m", tiny, "--method", "snapkv", "--max-context", "600")
    assert stats["read"] == "reindexed" and stats["compressed"]
    assert max(stats["retained_per_layer"]) <= 300 + 4  # half the free positions, and the 4-token question kept whole


def test_batch_jobs_keep_the_command_lines_floor(tiny, home, tmp_path):
    """A batch job with its own ratio keeps the --min-keep given on the command line."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(300))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "documents": [str(doc)], "questions": ["w1?"], "ratio": 0.05}) + "\n")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["batch", str(jobs), "-o", str(out), "-m", tiny, "--method", "snapkv", "--min-keep", "100",
                                 "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.stderr
    row = json.loads(out.read_text().splitlines()[0])
    assert sum(row["stats"]["retained_per_layer"]) == 2 * (100 + 4), row  # the question "w1?" (4 tokens) kept beside the floor


def test_help_states_the_default_floor():
    """`--help` shows --min-keep with the default the code uses."""
    result = runner.invoke(app, ["ask", "--help"], env={"COLUMNS": "300"})
    assert "--min-keep" in result.stdout and f"[default: {DEFAULT_MIN_KEEP}]" in result.stdout


@pytest.mark.model
def test_short_note_answers_as_the_full_cache(qwen):
    """On the default model, the 62-token note's answer at the default settings is the full cache's (PELICAN)."""
    from kvcli.methods import DEFAULT_METHOD, make_method
    from kvcli.reading import Options, QueryAware, answer

    note = ("Please read this note before the meeting. The kitchen will be closed on Friday. The code word is PELICAN. "
            "Remember to water the plants.")
    question = "What is the code word?"
    options = Options(max_new_tokens=12)
    mode = QueryAware(qwen, note, options)
    default = answer(qwen, mode.read(question, make_method(DEFAULT_METHOD)), options).text
    full = answer(qwen, mode.read(question, make_method("full")), options).text
    assert "PELICAN" in full and default == full


def test_eval_floors_its_ratios_with_min_keep(tiny, home, tmp_path):
    """`eval --ratios R --min-keep N` scores the floored cache (kept whole below N) as ask does; with --budgets it is refused."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"_id": "a", "context": words(300), "input": "w1?", "answers": ["w3"]}) + "\n")
    common = ["eval", "--data", str(data), "--methods", "snapkv", "-m", tiny, "--max-new-tokens", "2"]

    def compressed(*args) -> bool:
        out = tmp_path / f"out{len(args)}.json"
        result = runner.invoke(app, [*common, *args, "-o", str(out)])
        assert result.exit_code == 0, result.stderr
        return json.loads(out.read_text())["samples"][0]["compressed"]

    assert compressed("--ratios", "0.1")
    assert not compressed("--ratios", "0.1", "--min-keep", "2000")
    refused = runner.invoke(app, [*common, "--budgets", "64", "--min-keep", "100"])
    assert refused.exit_code == 2 and "--min-keep" in refused.stderr
