"""Skim (`--skim`): the filter reads the first layers, the chosen tokens go through all of them."""

from __future__ import annotations

import json

import pytest
import torch
from methodutil import assert_same_cache, build, squeeze, tiny_llama
from test_architectures import WINDOW, save_folder
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app
from kvcli.generate import capture, decode, prefill
from kvcli.methods import REGISTRY, plan_budget
from kvcli.methods.base import pool_scores
from kvcli.skim import SINK_TOKENS, SkimPlan, choose_tokens, skim_prefill

NUM_LAYERS = 6
PROMPT_LEN = 80
HEADS = ((1, 0), (2, 3), (2, 1))  # (layer, query head) filter heads of the tiny model: the filter reads 3 of 6 layers
TAIL = 10  # the prompt's last tokens, standing for the question

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model():
    """A random grouped-query Llama: 6 layers, 4 query heads sharing 2 KV heads."""
    return tiny_llama(NUM_LAYERS)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_token_continuing_is_the_one_pass_read(tiny_model, prompt, name):
    """With every token chosen, a skim keeps the one-pass read's cache (positions, keys, values) and decodes its tokens, for every method."""
    method = build(name, NUM_LAYERS, tiny_model.config.num_attention_heads)
    compression = squeeze(method, plan_budget(PROMPT_LEN, NUM_LAYERS, window_size=method.window_size, ratio=0.25))
    one_pass = prefill(tiny_model, prompt, compression)
    skimmed, report = skim_prefill(tiny_model, prompt, compression, SkimPlan(HEADS, tokens=PROMPT_LEN), head=4, tail=TAIL)
    assert report.continued == PROMPT_LEN and report.filter_layers == 3
    assert_same_cache(one_pass.cache, skimmed.cache)
    assert list(decode(tiny_model, one_pass, 8, set())) == list(decode(tiny_model, skimmed, 8, set()))


def test_the_chosen_tokens_are_those_the_filter_heads_rank_best(tiny_model, prompt):
    """The tokens read through every layer are the head, the question, and the runs the filter heads' pooled, normalised window scores rank best; every layer keeps only chosen tokens."""
    plan = SkimPlan(HEADS, tokens=24, span=4)
    state, report = skim_prefill(tiny_model, prompt, None, plan, head=6, tail=TAIL)
    captured = capture(tiny_model, prompt, plan.window)
    scores = torch.zeros(PROMPT_LEN)
    for layer, head in HEADS:
        probs = captured.observations[layer].window_attn.sum(dim=2)  # (num_kv_heads, group, n)
        pooled = pool_scores(probs, plan.kernel_size, "avg")
        row = pooled[divmod(head, pooled.shape[1])]
        scores += row / row.sum()
    expected = choose_tokens(scores, 6, TAIL, 24, 4)
    assert torch.equal(report.chosen, expected)
    assert report.continued == 6 + 24 + TAIL
    for layer in state.cache.layers:
        assert set(layer.kept_positions().flatten().tolist()) <= set(expected.tolist())


def test_choose_tokens_keeps_the_head_the_question_and_the_best_runs():
    """A planted high score is chosen with the run centred on it; the head (at least the sink tokens) and the tail always are; the count is what was asked."""
    scores = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 0.1
    scores[101] = 5.0  # the fact
    chosen = choose_tokens(scores, head=2, tail=12, tokens=16, span=8).tolist()
    assert chosen[:SINK_TOKENS] == list(range(SINK_TOKENS)) and chosen[-12:] == list(range(188, 200))
    assert set(range(98, 106)) <= set(chosen)  # the 8 tokens centred on it: 3 before, 4 after
    assert len(chosen) == SINK_TOKENS + 16 + 12 and chosen == sorted(set(chosen))
    everything = choose_tokens(scores, head=2, tail=12, tokens=10_000, span=8)
    assert torch.equal(everything, torch.arange(200))
    edge = torch.zeros(200)
    edge[SINK_TOKENS] = 1.0  # a peak at the first candidate: its run is cut at the head, not shifted into it
    assert choose_tokens(edge, head=2, tail=12, tokens=5, span=8).tolist()[:9] == list(range(9))


def test_skim_in_chunks_compresses_the_filter_layers_and_keeps_the_budget(tiny_model, prompt):
    """A chunked filter (the question probing each chunk) compresses its layers after each chunk and the read keeps the budget."""
    method = build("snapkv", NUM_LAYERS, 4)
    compression = squeeze(method, plan_budget(PROMPT_LEN, NUM_LAYERS, window_size=8, ratio=0.25))
    state, report = skim_prefill(tiny_model, prompt, compression, SkimPlan(HEADS, tokens=32), head=4, tail=TAIL,
                                 filter_compression=compression, chunk_size=24)
    assert report.chunks == 3 and report.continued == 4 + 32 + TAIL  # chunks start at 0, 24, 48; the last holds the question
    assert state.cache.retained_per_layer() == [20] * NUM_LAYERS
    assert len(list(decode(tiny_model, state, 4, set()))) == 4


# --- the command line, on tiny models saved in the test ---


def words(n: int, offset: int = 0) -> str:
    return " ".join(f"w{(offset + 7 * i) % 60}" for i in range(n))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A four-layer random Llama folder with 1,024 positions."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024, layers=4))


def ask(*args, input=None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    return result


def ask_json(*args) -> dict:
    result = ask(*args, "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout.splitlines()[-1]) if "\n" in result.stdout.strip() else json.loads(result.stdout)


def test_ask_skim_reports_the_skim(tiny, home, tmp_path):
    """`ask --skim --json` reads in mode skim, says the filter's depth and heads and the tokens that continued, and the text report says it too."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(600))
    out = ask_json("ask", doc, "w3?", "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4", "--max-new-tokens", "3")
    stats = out["stats"]
    skim = stats["extra"]["skim"]
    assert stats["read"] == "skim" and skim["prompt_tokens"] == stats["prompt_tokens"]
    assert skim["filter_layers"] == 2 and skim["layers"] == 4 and skim["filter_heads"]  # --skim-depth 0.4: layer 1 of 0-3
    assert skim["continued_tokens"] < stats["prompt_tokens"] and skim["positions"] == "original"
    assert stats["prefill_s"] >= skim["filter_s"] + skim["read_s"] - 1e-3
    assert max(stats["retained_per_layer"]) <= skim["continued_tokens"]
    text = ask("ask", doc, "w3?", "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4", "--max-new-tokens", "3")
    assert text.exit_code == 0 and "skimmed" in text.stderr and f"through {skim['filter_layers']} of 4 layers" in text.stderr


def test_skim_that_would_keep_every_token_reads_one_pass_and_says_so(tiny, home, tmp_path):
    """`--skim` on a document no longer than --skim-tokens reads it in one pass (the filter would only add work), answers as the plain read, and says why."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(400))
    flags = ("-m", tiny, "--method", "snapkv", "--ratio", "0.3", "--max-new-tokens", "6")
    plain = ask_json("ask", doc, "w3?", *flags)
    skim = ask_json("ask", doc, "w3?", *flags, "--skim", "--skim-tokens", "2048")
    assert skim["stats"]["read"] == "query" and "no longer than --skim-tokens 2,048" in skim["stats"]["extra"]["skim"]["skipped"]
    assert skim["answer"] == plain["answer"] and skim["stats"]["retained_per_layer"] == plain["stats"]["retained_per_layer"]


def test_skim_past_the_context_stays_within_the_positions(tiny, home, tmp_path):
    """Past --max-context the filter reads in re-indexed chunks and the chosen tokens are read packed: every position stays below the limit."""
    from kvcli.models import load_model
    from kvcli.reading import Options
    from kvcli.reading.policy import choose
    from kvcli.reading.reader import Reader
    from kvcli.reading.skim import Skimming

    from kvcli.methods import Budget, make_method

    reader = Reader(load_model(tiny))
    options = Options(max_context=160, max_new_tokens=8, skim=Skimming(tokens=400), budget=Budget(ratio=0.1))
    method = make_method("snapkv")
    mode = choose(reader, words(900), options, method, ["w3?"])
    reading = mode.read("w3?", method)
    skim, state = reading.skim, reading.state
    assert reading.mode == "skim" and reading.past["chunks"] == skim["filter_chunks"] > 3
    assert skim["positions"] == "packed" and skim["continued_tokens"] + 8 <= 160
    for layer in state.cache.layers:
        assert int(layer.rope_positions().max()) < state.next_position
    assert state.next_position + 8 <= 160 and state.prompt_len > 900
    tokens = list(decode(reader.model, state, 8, set()))
    assert len(tokens) == 8


def test_skim_on_gemma3_keeps_the_sliding_windows_and_with_every_token_is_one_pass(tmp_path, home):
    """On Gemma 3 (sliding-window layers) a skim keeps each sliding layer's window, and with every token chosen keeps the one-pass cache."""
    from test_architectures import PROMPT_LEN as N, compression, models, prompt as arch_prompt

    _, model = models("gemma3")
    ids = arch_prompt(n=N)
    squeezed, _ = compression(model, "snapkv")
    heads = ((2, 0), (2, 1))  # the one global layer's heads
    one_pass = prefill(model, ids, squeezed)
    whole, _ = skim_prefill(model, ids, squeezed, SkimPlan(heads, tokens=N), head=4, tail=8)
    assert_same_cache(one_pass.cache, whole.cache)
    folder = save_folder("gemma3", tmp_path / "gemma3")
    doc = tmp_path / "doc.txt"
    doc.write_text(words(300))
    skim = ask_json("ask", doc, "w3?", "-m", folder, "--method", "snapkv", "--ratio", "0.3", "--max-new-tokens", "4",
                    "--skim", "--skim-tokens", "24")["stats"]
    assert skim["read"] == "skim" and [skim["retained_per_layer"][i] for i in (0, 1, 3)] == [WINDOW - 1] * 3


def test_several_questions_with_skim_take_the_cheaper_read(tiny, home, tmp_path):
    """`-q` x N with --skim skims for each question when that costs less than one full read, else reads once, and says which in the report."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(600))
    result = ask("ask", doc, "-q", "w3?", "-q", "w5?", "-m", tiny, "--skim", "--skim-tokens", "32", "--skim-depth", "0.4", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[0])["stats"]
    choice = first["extra"]["skim_choice"]
    if first["read"] == "skim":
        assert "skimming for each of the 2 questions" in choice
    else:
        assert first["read"] == "once" and "reading the documents once" in choice
    many = ask("ask", doc, *[x for i in range(12) for x in ("-q", f"w{i}?")], "-m", tiny, "--skim", "--max-new-tokens", "1", "--json")
    assert many.exit_code == 0, many.stderr
    assert json.loads(many.stdout.splitlines()[0])["stats"]["read"] == "once"


def test_compare_with_skim_compares_the_skim_with_the_full_read(tiny, home, tmp_path):
    """`ask --skim --compare` answers from the skim and from the full cache of the whole document."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(400))
    out = ask_json("ask", doc, "w3?", "-m", tiny, "--skim", "--skim-tokens", "32", "--skim-depth", "0.4", "--compare", "--max-new-tokens", "3")
    assert out["stats"]["read"] == "skim" and "full_cache_answer" in out and "full_cache_read" not in out


@pytest.mark.parametrize("args, words_", [
    (("--skim-tokens", "64"), ("--skim-tokens", "add --skim")),
    (("--skim", "--reuse"), ("--skim", "--reuse")),
    (("--skim", "--skim-tokens", "0"), ("--skim-tokens must be at least 1",)),
    (("--skim", "--skim-depth", "1.5"), ("--skim-depth must be in (0, 1]",)),
])
def test_skim_mistakes_get_one_line(tiny, home, tmp_path, args, words_):
    """Skim knobs without --skim, --skim with --reuse, and bad knob values are refused in one line."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(50))
    result = ask("ask", doc, "w3?", "-m", tiny, *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert all(w in lines[0] for w in words_), lines[0]


def test_eval_skim_mode_scores_beside_the_one_pass_read(tiny, home, tmp_path):
    """`eval --modes query,skim` scores each method in both modes against one full cache."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"context": words(300, k), "input": "w3?", "answers": ["w3"], "_id": str(k)}) for k in range(2)))
    result = ask("eval", "--data", rows, "-m", tiny, "--methods", "full,snapkv", "--ratios", "0.3", "--modes", "query,skim",
                 "--skim-tokens", "48", "--metric", "contains", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    settings = {(s["method"], s["mode"]) for s in json.loads(result.stdout)["summary"]}
    assert {("full", "query"), ("snapkv", "query"), ("snapkv", "skim")} <= settings


def test_batch_skims_and_its_answers_are_asks(tiny, home, tmp_path):
    """`batch --skim` reads each question by skimming, as `ask --skim` does (the same answer and kept tokens), and a run without --skim does not reuse those answers."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(600))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "documents": str(doc), "question": "w3?"}) + "\n")
    out = tmp_path / "answers.jsonl"
    flags = ("-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4", "--max-new-tokens", "3")
    result = ask("batch", jobs, "-o", out, *flags)
    assert result.exit_code == 0, result.stderr
    row = json.loads(out.read_text().splitlines()[0])
    alone = ask_json("ask", doc, "w3?", *flags)
    assert row["stats"]["read"] == "skim" and row["answer"] == alone["answer"]
    assert row["stats"]["retained_per_layer"] == alone["stats"]["retained_per_layer"]
    again = ask("batch", jobs, "-o", out, "-m", tiny, "--max-new-tokens", "3")
    assert again.exit_code == 0 and "1 answered" in again.stderr, again.stderr


@pytest.mark.model
def test_the_default_model_skims_a_planted_fact_through_every_layer(qwen):
    """On the default model a fact planted in 3,000 tokens of prose is among the tokens the filter heads send through every layer, and the skimmed read answers it."""
    from helpers_text import prose, with_needle

    from kvcli.methods import make_method
    from kvcli.reading import Options, answer
    from kvcli.reading.policy import choose
    from kvcli.reading.skim import Skimming

    fact, question, code = "The combination of the harbour office safe is 4-7-2-9.", "What is the combination of the harbour office safe?", "4-7-2-9"
    text = with_needle(prose(qwen.tokenizer, 3000, start_topic="exceptions"), fact, 0.4)
    options = Options(skim=Skimming(tokens=512), max_new_tokens=16)
    method = make_method("evidencekv")
    mode = choose(qwen, text, options, method, [question])
    reading = mode.read(question, method)
    prompt = reading.prompt
    start = text.index(code)
    planted = [p for p in range(len(prompt)) if (o := prompt.doc_offset(p)) is not None and start <= o < start + len(code)]
    assert reading.mode == "skim" and reading.skim["continued_tokens"] < len(prompt) // 4
    kept = set(reading.state.cache.layers[-1].kept_positions().flatten().tolist())
    assert planted and set(planted) <= kept  # through every layer, down to the last
    assert code in answer(qwen, reading, options).text


def test_plan_shows_the_prefill_work_with_and_without_skim(tiny, home, tmp_path):
    """`plan --skim` says the filter's depth and the share of a full read's work once the model's profile exists (before: that it comes with the profile)."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(600))
    before = json.loads(ask("plan", doc, "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4", "--json").stdout)["skim"]
    assert before == {"asked": True, "filter_layers": None}
    skimmed = ask_json("ask", doc, "w3?", "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4", "--max-new-tokens", "2")["stats"]["extra"]["skim"]
    after = json.loads(ask("plan", doc, "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4", "--json").stdout)["skim"]
    assert after["filter_layers"] == skimmed["filter_layers"] and after["layers"] == 4
    assert after["work"] == after["continued_tokens"] * 4 + after["filter_layers"] * (after["full_work"] // 4)
    assert 0 < after["share"] < 1
    text = ask("plan", doc, "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4")
    assert text.exit_code == 0 and "with --skim (asked)" in text.stdout and "of a full read's token x layer work" in text.stdout


def test_a_skim_that_would_cost_more_than_a_full_read_reads_one_pass(tiny, home, tmp_path):
    """A filter as deep as the model (--skim-depth 1) would cost more than reading every token: the prompt is read in one pass, and the report says why."""
    doc = tmp_path / "doc.txt"
    doc.write_text(words(600))
    stats = ask_json("ask", doc, "w3?", "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "1", "--max-new-tokens", "2")["stats"]
    assert stats["read"] == "query" and "would cost more than reading every token" in stats["extra"]["skim"]["skipped"]


def test_a_fact_goes_on_as_its_whole_sentence():
    """With sentence starts, the best-scored token brings its whole sentence (the run between two starts), so a fact is never cut at a fixed boundary."""
    scores = torch.zeros(120)
    scores[57] = 1.0  # one token of the fact, in the sentence at 50..70
    starts = torch.tensor([10, 30, 50, 70, 90])
    chosen = choose_tokens(scores, head=4, tail=10, tokens=20, span=16, starts=starts).tolist()
    assert set(range(50, 70)) <= set(chosen) and len(chosen) == 4 + 20 + 10


def test_sources_of_a_skimmed_answer_cite_the_document(tiny, home, tmp_path):
    """`--skim --sources` cites passages of the document by their lines, mapped back through the chosen tokens' own positions."""
    doc = tmp_path / "doc.txt"
    lines = [" ".join(f"w{(7 * i + j) % 60}" for j in range(10)) + "." for i in range(60)]
    doc.write_text("\n".join(lines))
    out = ask_json("ask", doc, "w3?", "-m", tiny, "--skim", "--skim-tokens", "64", "--skim-depth", "0.4", "--sources", "--max-new-tokens", "3")
    assert out["stats"]["read"] == "skim" and out["sources"]
    for source in out["sources"]:
        start, end = source["lines"]
        assert 1 <= start <= end <= 60 and source["text"].split()[0] in " ".join(lines[start - 1 : end])


def test_a_long_prompt_is_filtered_in_chunks_without_compressing_the_filter_layers(tiny_model, prompt):
    """A filter read in chunks with nothing compressing it (a long prompt within the positions) keeps its layers' KV whole, and the read still keeps only chosen tokens."""
    state, report = skim_prefill(tiny_model, prompt, None, SkimPlan(HEADS, tokens=16), head=4, tail=TAIL, chunk_size=24)
    assert report.chunks == 3 and report.continued == 4 + 16 + TAIL
    chosen = set(report.chosen.tolist())
    for layer in state.cache.layers:
        assert set(layer.kept_positions().flatten().tolist()) == chosen


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_compresses_what_a_skim_sends_on(tiny_model, prompt, name):
    """Every method compresses a skim's chosen tokens: each layer keeps only chosen tokens, within the budget, and decoding goes on from it."""
    method = build(name, NUM_LAYERS, tiny_model.config.num_attention_heads)
    compression = squeeze(method, plan_budget(PROMPT_LEN, NUM_LAYERS, window_size=method.window_size, ratio=0.2))
    state, report = skim_prefill(tiny_model, prompt, compression, SkimPlan(HEADS, tokens=30), head=4, tail=TAIL)
    chosen = set(report.chosen.tolist())
    kept = state.cache.retained_per_layer()
    for layer in state.cache.layers:
        assert set(layer.kept_positions().flatten().tolist()) <= chosen
    if compression is not None:
        assert sum(kept) <= compression.plan.total
    assert len(list(decode(tiny_model, state, 4, set()))) == 4


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "dynamickv"])
def test_a_skim_with_a_long_question_keeps_the_documents_budget_and_the_question(name):
    """--budget N on a skim whose question is longer than the window: every method keeps N of the document's tokens
    per layer on average and the whole question beside them, as a one-pass read does (pyramidkv's ramp included)."""
    from kvcli.methods import Budget, Compression, make_method, question_plan

    n, question, budget = 200, 30, 30
    model = tiny_llama(NUM_LAYERS)
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(1))
    method = make_method(name)
    plan, _ = question_plan(Budget(tokens=budget), n, NUM_LAYERS, method.window_size, question)
    compression = Compression(method, plan, None, question=question)
    state, _ = skim_prefill(model, ids, compression, SkimPlan(HEADS, tokens=40), head=4, tail=question)
    assert sum(state.cache.retained_per_layer()) == (budget + question) * NUM_LAYERS
    for layer in state.cache.layers:
        for positions in layer.head_positions():
            assert set(range(n - question, n)) <= set(positions.tolist())  # the whole question, in every head
