"""The reading modes on a tiny random Llama with a real (word-level) tokenizer: what each mode
keeps, how budgets meet short prompts, prompts that fit, and sampling that leaves the global RNG alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from methodutil import assert_same_cache
from test_models import save_tiny_llama

from kvcli.errors import BudgetError, InputError
from kvcli.generate import Sampling
from kvcli.methods import Budget, make_method
from kvcli.models import load_model
from kvcli.prompt import REUSE_INSTRUCTION, build_prompt, question_suffix
from kvcli.reading import Options, QueryAware, Reader, Reused, answer

pytestmark = pytest.mark.usefixtures("one_thread")


def words(n: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 60, (n,), generator=gen))


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A two-layer random Llama with 1,024 positions and a word-level tokenizer, as a Reader."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024)
    return Reader(load_model(str(folder)))


# --- budgets ----------------------------------------------------------------------------------


def test_default_ratio_on_a_short_prompt_keeps_the_window_and_says_so():
    """A 49-token prompt at the default ratio without its floor (4.9 tokens per layer) keeps window + 1 per layer, with a note, instead of failing."""
    plan, note = Budget(min_keep=0).plan(49, 24, window_size=8)
    assert plan is not None and plan.total == 9 * 24
    assert "4.9 tokens per layer" in note and "kept 9 per layer" in note


def test_a_prompt_no_longer_than_the_window_is_not_compressed():
    """A prompt no longer than window + 1 tokens is kept whole, with the reason."""
    plan, note = Budget(ratio=0.5).plan(9, 4, window_size=8)
    assert plan is None and "too short" in note


def test_an_explicit_budget_below_the_window_is_an_error():
    """Only an explicit --budget that the window alone would fill is refused."""
    with pytest.raises(BudgetError, match="not larger than the observation window"):
        Budget(tokens=8).plan(1000, 4, window_size=8)
    assert Budget(tokens=9).plan(1000, 4, window_size=8)[0].total == 36


@pytest.mark.parametrize("ratio,tokens", [(0.5, 10), (0.0, None), (1.5, None), (None, 0)])
def test_budget_checks_live_in_one_place(ratio, tokens):
    """Both given, a ratio outside (0, 1] or a non-positive budget is refused by Budget itself."""
    with pytest.raises(BudgetError):
        Budget(ratio, tokens)


# --- modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["snapkv", "dynamickv", "h2o", "evidencekv"])
def test_query_aware_read_equals_derive(reader, name):
    """QueryAware.read (live) and QueryAware.derive (from one capture) keep the same cache for every layer and head."""
    options = Options(budget=Budget(ratio=0.3), max_new_tokens=4)
    mode = QueryAware(reader, words(300), options)
    method = make_method(name)
    live = mode.read("w5 w6?", method)
    derived = mode.derive(mode.capture("w5 w6?", method.window_size, method.needs_accumulated), "w5 w6?", method)
    assert live.state.compressed and derived.state.compressed
    assert_same_cache(live.state.cache, derived.state.cache)
    assert answer(reader, live, options).tokens == answer(reader, derived, options).tokens


def test_reused_read_equals_derive_and_answers_after_a_copy(reader):
    """Reused.read and Reused.derive keep the same prefix, and asking a question leaves the prefix untouched."""
    options = Options(budget=Budget(ratio=0.3), max_new_tokens=4)
    mode = Reused(reader, words(300), options, scorer="instruction")
    method = make_method("snapkv")
    live = mode.read(method)
    derived = mode.derive(mode.capture(method.window_size), method)
    assert_same_cache(live.state.cache, derived.state.cache)
    before = live.state.cache.retained_per_layer()
    reading = live.ask(reader, "w5 w6?", options)
    assert live.state.cache.retained_per_layer() == before
    suffix = question_suffix(reader.tokenizer, "w5 w6?", REUSE_INSTRUCTION)
    assert reading.state.prompt_len == live.state.prompt_len + suffix.shape[1]


def test_chunked_reuse_probes_every_chunk_with_the_instruction(reader, monkeypatch):
    """compress/--reuse in chunks feed the generic instruction after every chunk, as the last chunk is scored by it."""
    import kvcli.reading.prefix

    seen = {}
    real = kvcli.reading.prefix.prefill

    def spy(model, ids, compression=None, **kwargs):
        seen.update(kwargs)
        return real(model, ids, compression, **kwargs)

    monkeypatch.setattr(kvcli.reading.prefix, "prefill", spy)
    mode = Reused(reader, words(300), Options(budget=Budget(ratio=0.3), chunk_size=64), scorer="instruction")
    prefix = mode.read(make_method("snapkv"))
    assert len(prefix.state.chunks) > 1
    probe = seen["probe_ids"]
    assert probe is not None and probe.shape[1] > 0
    assert torch.equal(probe[0], mode.prompt.ids[0, mode.prompt.doc_end : mode.prompt.prefix_len])


def test_chunked_query_read_keeps_the_budget(reader):
    """A chunked query-aware read keeps exactly the budget (of the document: the prompt before the question)
    and the question, and says it was read in chunks."""
    from kvcli.methods import question_plan

    options = Options(budget=Budget(ratio=0.25), chunk_size=64)
    mode = QueryAware(reader, words(300), options)
    reading = mode.read("w5?", make_method("snapkv"))
    assert reading.mode == "chunked" and len(reading.state.chunks) > 1
    question = mode.prompt("w5?").question_len
    plan, _ = question_plan(options.budget, reading.state.prompt_len, reader.num_layers, 8, question)
    document, _ = options.budget.plan(reading.state.prompt_len - question, reader.num_layers, 0)
    assert reading.state.compression.plan == plan and plan.total == document.total + min(8, question) * reader.num_layers
    assert sum(reading.state.cache.retained_per_layer()) == document.total + question * reader.num_layers


LONG_QUESTION = " ".join(f"w{i}" for i in range(10, 40)) + "?"  # more tokens than any observation window


def test_live_chunks_says_one_pass_where_the_prompt_before_the_question_fits_one_chunk(reader):
    """The question stays in the last chunk: a chunk size between the prompt before the question and the whole
    prompt reads one pass, and live_chunks (which decides whether one capture serves --compare and eval) says so."""
    options = Options(budget=Budget(ratio=0.25))
    mode = QueryAware(reader, words(300), options)
    prompt = mode.prompt(LONG_QUESTION)
    between = len(prompt) - prompt.question_len // 2
    assert mode.live_chunks(LONG_QUESTION, make_method("snapkv"), chunk_size=between) is None
    assert len(mode.read(LONG_QUESTION, make_method("snapkv"), chunk_size=between).state.chunks) == 1
    shorter = len(prompt) - prompt.question_len - 10
    assert mode.live_chunks(LONG_QUESTION, make_method("snapkv"), chunk_size=shorter) == shorter
    assert len(mode.read(LONG_QUESTION, make_method("snapkv"), chunk_size=shorter).state.chunks) == 2


@pytest.mark.parametrize("name", ["snapkv", "dynamickv", "evidencekv"])
def test_a_query_aware_read_keeps_its_question_whole_beside_the_budget(reader, name):
    """--budget B in a query-aware read keeps B tokens per layer of the document and the whole question beside
    them, one pass, in chunks or read once; none of the question's tokens is dropped."""
    from kvcli.reading import ReadOnce

    options = Options(budget=Budget(tokens=24), max_new_tokens=4)
    document = words(300)
    method = make_method(name)
    mode = QueryAware(reader, document, options)
    prompt = mode.prompt(LONG_QUESTION)
    question = prompt.question_len
    assert question > 2 * method.window_size
    one_pass = mode.read(LONG_QUESTION, method)
    chunked = QueryAware(reader, document, Options(budget=Budget(tokens=24), chunk_size=64)).read(LONG_QUESTION, method)
    once = ReadOnce(reader, document, options, accumulated=method.needs_accumulated).read(LONG_QUESTION, method)
    for reading in (one_pass, chunked, once):
        assert sum(reading.state.cache.retained_per_layer()) == (24 + question) * reader.num_layers
        for layer in reading.state.cache.layers:
            kept = layer.kept_positions()
            assert torch.equal(kept[:, -question:], torch.arange(len(prompt) - question, len(prompt)).expand(kept.shape[0], -1))
    for a, b in zip(once.state.cache.layers, one_pass.state.cache.layers, strict=True):  # what one pass keeps, as read once
        assert torch.equal(a.kept_positions(), b.kept_positions())


# --- prompts that fit -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(doc_words=st.integers(1, 400), limit=st.integers(60, 300), reserve=st.integers(0, 40))
def test_prompt_and_answer_never_pass_the_context(reader, doc_words, limit, reserve):
    """Whatever the document, the prompt plus the room kept for the answer fits max_context, and a cut is reported."""
    try:
        prompt = build_prompt(reader.tokenizer, words(doc_words), "w1?", max_context=limit, reserve=reserve)
    except InputError:
        return  # no room at all: refused in one line
    assert len(prompt) + reserve <= limit
    whole = build_prompt(reader.tokenizer, words(doc_words), "w1?", max_context=1 << 20)
    assert (prompt.dropped_tokens == 0) == (len(whole) + reserve <= limit)


def test_reader_prompt_reserves_the_whole_answer(reader):
    """Reader.prompt keeps room for every token of --max-new-tokens within the model's positions."""
    options = Options(max_new_tokens=300)
    prompt = reader.prompt(words(2000), "w1?", options)
    assert prompt.dropped_tokens > 0
    assert len(prompt) + 300 <= reader.max_positions


def test_system_prompt_reaches_the_model(reader):
    """--system text is part of the prompt's prefix, before the document."""
    prompt = build_prompt(reader.tokenizer, "w1 w2 w3", "w4?", max_context=200, system="w9 w9 w9")
    assert prompt.text.index("w9 w9 w9") < prompt.text.index("w1 w2 w3")
    assert prompt.text.index("w1 w2 w3") == prompt.doc_start


# --- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [None, 7])
def test_sampling_leaves_the_global_rng_alone(seed):
    """Sampling draws from a generator of its own: torch's global RNG state is the same before and after."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=seed)
    gen = sampling.generator("cpu")
    picks = [sampling.pick(torch.randn(50, generator=torch.Generator().manual_seed(i)), gen) for i in range(20)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(0 <= p < 50 for p in picks)


def test_a_seed_repeats_its_samples():
    """The same --seed gives the same samples; greedy ignores it."""
    logits = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(20)]

    def run(seed):
        sampling = Sampling(temperature=1.0, seed=seed)
        gen = sampling.generator("cpu")
        return [sampling.pick(x, gen) for x in logits]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert Sampling().pick(logits[0], None) == int(logits[0].argmax())


# --- read once, compress per question ------------------------------------------------------------


@pytest.mark.parametrize("name", ["full", "streamingllm", "h2o", "snapkv", "pyramidkv", "dynamickv", "evidencekv"])
def test_read_once_keeps_what_one_pass_keeps(reader, name):
    """For every method, each question fed after a once-read full prefix keeps the positions (every layer and KV head),
    keys and values a one-pass read of that question keeps, answers the same tokens, and leaves the prefix untouched."""
    from kvcli.reading import ReadOnce

    options = Options(budget=Budget(ratio=0.2), max_new_tokens=5)
    document = words(400, seed=3)
    method = make_method(name)
    once = ReadOnce(reader, document, options, accumulated=method.needs_accumulated)
    prefix = once.read_prefix().state
    held = prefix.cache.retained_per_layer()
    for question in ("w5 w6 w7?", "w40 w2?"):
        one_pass = QueryAware(reader, document, options).read(question, method)
        fed = once.read(question, method)
        assert fed.mode == "once" and fed.state.prompt_len == one_pass.state.prompt_len
        # the full prefix is held beside the question's fork, whose layer copies it once: the peak counts both
        assert fed.state.cache.kv_peak_nbytes >= prefix.cache.nbytes() + fed.state.cache.nbytes()
        for a, b in zip(fed.state.cache.layers, one_pass.state.cache.layers, strict=True):
            assert torch.equal(a.kept_positions(), b.kept_positions())
            for x, y in zip(a.view(), b.view()):
                assert torch.allclose(x, y, atol=1e-5)
        assert answer(reader, fed, options).tokens == answer(reader, one_pass, options).tokens
        assert prefix.cache.retained_per_layer() == held


# --- past the context window --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["streamingllm", "h2o", "snapkv", "pyramidkv", "dynamickv", "evidencekv"])
def test_a_document_four_times_the_positions_reads_without_passing_them(reader, name):
    """For every compressing method, a prompt 4x the model's positions is read in chunks; no position fed to the model
    (prefill or decode) reaches max_position_embeddings; the cache keeps the budget; kept entries keep their original positions."""
    limit = reader.max_positions
    options = Options(budget=Budget(tokens=96), max_new_tokens=6)
    mode = QueryAware(reader, words(4 * limit, seed=5), options)
    method = make_method(name)
    reader.profile()  # evidencekv's retrieval-head profile is computed (within the positions) before counting
    fed = []
    hook = reader.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(int(kwargs["position_ids"].max())), with_kwargs=True)
    try:
        reading = mode.read("w5 w6?", method)
        answer(reader, reading, options)
    finally:
        hook.remove()
    assert reading.mode == "reindexed" and reading.state.prompt_len > 4 * limit
    assert max(fed) < limit and len(fed) > 4
    plan = reading.state.compression.plan
    question = mode.prompt("w5 w6?").question_len
    assert plan.total == (96 + min(method.window_size, question)) * reader.num_layers  # the document's 96, the window's question tokens
    kept = plan.total + reading.state.compression.kept_whole * reader.num_layers
    assert sum(reading.state.cache.retained_per_layer()) == kept + 5 * reader.num_layers  # 5 decode steps
    for layer in reading.state.cache.layers:
        kept = layer.kept_positions()
        assert (kept[:, 1:] > kept[:, :-1]).all() and (kept[:, -6] == reading.state.prompt_len - 1).all()
        assert (layer.rope_positions() < limit).all()


def test_a_rope_that_cannot_move_is_refused(reader, monkeypatch):
    """Reading past the context with a dynamic-NTK RoPE is one KvcliError naming it, before anything is read."""
    from kvcli.errors import KvcliError

    config = reader.model.config
    monkeypatch.setattr(config, "rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, raising=False)
    monkeypatch.setattr(reader, "_layout", None, raising=False)
    mode = QueryAware(reader, words(3000), Options(budget=Budget(tokens=64), max_new_tokens=4))
    with pytest.raises(KvcliError, match="dynamic"):
        mode.read("w1?", make_method("snapkv"))


def test_sections_cover_the_text_in_order_and_fit(tokenizer):
    """split_sections cuts a text at sentence ends into consecutive sections of at most the size asked, losing nothing."""
    from kvcli.reading.sections import split_sections

    text = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(200)) + "\n\nA last paragraph without an end"
    for size in (40, 97, 500):
        sections = split_sections(tokenizer, text, size)
        assert "".join(sections) == text
        assert all(len(tokenizer(s, add_special_tokens=False)["input_ids"]) <= size for s in sections)
        assert all(s.rstrip().endswith(".") for s in sections[:-1])
    long_sentence = "word " * 300
    cut = split_sections(tokenizer, long_sentence, 64)
    assert len(cut) >= 5 and all(len(tokenizer(s, add_special_tokens=False)["input_ids"]) <= 64 for s in cut)


def test_sections_stop_when_the_joined_summaries_never_fit(reader):
    """Section summaries longer than their sections end in one InputError naming what to raise, after a bounded
    number of rounds, instead of summarizing the summaries forever."""
    from kvcli.reading import Sections

    options = Options(budget=Budget(tokens=64), max_new_tokens=70, max_context=169)  # 64-token sections, 70-token summaries
    summarized = []

    def on_section(done: int, total: int) -> None:
        summarized.append(done)
        assert len(summarized) < 40, "the rounds of section summaries never end"

    with pytest.raises(InputError, match="raise --max-context"):
        Sections(reader, words(150, seed=2), options).read("w1 w2?", make_method("snapkv"), on_section=on_section)


def test_sections_count_their_time_to_the_first_token_once(reader):
    """The sections are read and summarized inside `Sections.read`, after the answer's clock starts:
    the time to the first token holds them once (they were also charged to the reading, twice in all)."""
    import time

    from kvcli.reading import Sections
    from kvcli.reading.answer import answer

    options = Options(budget=Budget(tokens=64), max_new_tokens=4, max_context=200)
    began = time.perf_counter()
    reading = Sections(reader, words(600, seed=3), options).read("w1 w2?", make_method("snapkv"))
    result = answer(reader, reading, options, started=began)
    elapsed = time.perf_counter() - began
    assert reading.mode == "sections" and reading.past["sections"] >= 3 and reading.past["sections_s"] > 0
    assert result.ttft_s <= elapsed  # the first token came before the answer ended, whatever the machine's speed


# --- the reading policy ---------------------------------------------------------------------------


def test_compare_past_the_context_reads_as_ask_and_compares_a_full_read_that_fits(reader):
    """`ask --compare` past the context: no position fed reaches max_position_embeddings, the compressed answer is
    the plain read's, and the full cache is of the documents cut to fit (said in its label)."""
    from kvcli.reading.policy import choose

    limit = reader.max_positions
    options = Options(budget=Budget(tokens=96), max_new_tokens=4)
    document, question, method = words(2 * limit, seed=7), "w5 w6?", make_method("snapkv")
    plain = choose(reader, document, options, method, [question])
    expected = answer(reader, plain.read(question, method), options).tokens
    fed = []
    hook = reader.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(int(kwargs["position_ids"].max())), with_kwargs=True)
    try:
        compare = choose(reader, document, options, method, [question], compare=True)
        reading = compare.read(question, method)
        compressed = answer(reader, reading, options).tokens
        full = compare.full()
        answer(reader, full, options)
    finally:
        hook.remove()
    assert reading.mode == "reindexed" and compressed == expected
    assert max(fed) < limit
    assert not full.state.compressed and full.dropped_tokens > 0 and "cut in the middle" in compare.full_label


def test_compare_within_the_context_shares_one_capture_only_for_a_one_pass_read(reader):
    """--compare derives both caches from one capture for a one-pass read; with --chunk-size it reads the chunks as
    `ask` would (the same answer) and the full cache apart."""
    from kvcli.reading.policy import choose

    document, question, method = words(400, seed=8), "w9?", make_method("snapkv")
    for chunk_size, shared in ((None, True), (64, False)):
        options = Options(budget=Budget(tokens=48), max_new_tokens=4, chunk_size=chunk_size)
        expected = answer(reader, choose(reader, document, options, method, [question]).read(question, method), options).tokens
        compare = choose(reader, document, options, method, [question], compare=True)
        reading = compare.read(question, method)
        assert answer(reader, reading, options).tokens == expected
        assert reading.mode == ("query" if shared else "chunked") and compare.full_label == "full cache"
        assert not compare.full().state.compressed


@pytest.mark.parametrize("questions, chunk_size, expected", [
    (["w1?"], None, "query"), (["w1?", "w2?"], None, "once"), (None, None, "once"), (["w1?", "w2?"], 64, "query"),
])
def test_one_rule_chooses_the_mode_for_every_command(reader, questions, chunk_size, expected):
    """choose() reads once for several (or unknown) questions within the context, else one read per question."""
    from kvcli.reading.policy import choose

    options = Options(budget=Budget(tokens=48), max_new_tokens=4, chunk_size=chunk_size)
    assert choose(reader, words(300), options, make_method("snapkv"), questions).name == expected


def test_several_questions_past_the_context_read_each_one_past_it(reader):
    """Past the positions several questions get a re-indexed read each (no full prefix to read once)."""
    from kvcli.reading.policy import choose

    mode = choose(reader, words(2 * reader.max_positions), Options(budget=Budget(tokens=96), max_new_tokens=4),
                  make_method("snapkv"), ["w1?", "w2?"])
    assert mode.name == "query" and mode.read("w1?", make_method("snapkv")).mode == "reindexed"
