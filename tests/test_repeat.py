"""The repeat scorer (kvcli/repeat.py, `--scorer repeat`): scores from the model repeating its document,
on tensors built in the test and on tiny random Llamas built in-process."""

from __future__ import annotations

import json

import pytest
import torch
from methodutil import assert_same_cache, tiny_llama
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app
from kvcli.errors import InputError
from kvcli.eval import EvalConfig, Row, run_eval
from kvcli.eval.settings import settings_for
from kvcli.generate import Prefill, prefill, prepare_model
from kvcli.methods import Budget, BudgetPlan, Compression, LayerObservation, make_method
from kvcli.methods.base import pool_scores
from kvcli.models import load_model
from kvcli.reading import Options, Reader, Reused, answer
from kvcli.reading.prefix import pick_scorer
from kvcli.repeat import _decoder_outputs, first_cut, keep_by_scores, peak_attention, repeat_scores, token_surprisal, weigh

pytestmark = pytest.mark.usefixtures("one_thread")


def words(n: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 60, (n,), generator=gen))


@pytest.fixture(scope="module")
def model():
    """A six-layer random grouped-query Llama (4 query heads on 2 KV heads), float32 on the CPU."""
    return tiny_llama(6)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A two-layer random Llama with 1,024 positions and a word-level tokenizer, as a Reader."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024)
    return Reader(load_model(str(folder)))


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


PROMPTS = {0: ids(5, 1)}


def prompt_for(start: int) -> torch.Tensor:
    """A request of its own for each chunk start, as the reading layer makes them."""
    return PROMPTS.setdefault(start, ids(4, 100 + start))


# --- the score itself, model-free -------------------------------------------------------------------


def reference_peak(query, keys, scaling, n_keys):
    """Peak attention the plain way: keys repeated per query head, one causal softmax, max over queries."""
    group = query.shape[1] // keys.shape[1]
    q_len, k_len = query.shape[2], keys.shape[2]
    logits = query[0].float() @ keys[0].float().repeat_interleave(group, dim=0).transpose(1, 2) * scaling
    mask = torch.arange(k_len)[None, :] > torch.arange(q_len)[:, None] + (k_len - q_len)
    probs = logits.masked_fill(mask, float("-inf")).softmax(dim=-1)  # (num_heads, q_len, k_len)
    return probs.amax(dim=1)[:, :n_keys].reshape(keys.shape[1], group, n_keys)


def test_peak_attention_is_the_max_causal_attention_probability_per_query_head():
    """peak_attention equals the max over queries of the causal softmax, per query head grouped by KV head, in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(1, 6, 9, 8, generator=gen), torch.randn(1, 2, 40, 8, generator=gen)
    peak = peak_attention(query, keys, 0.35, 31)
    assert peak.shape == (2, 3, 31)
    torch.testing.assert_close(peak, reference_peak(query, keys, 0.35, 31))
    assert 0 <= float(peak.min()) and float(peak.max()) <= 1


def test_peak_attention_in_small_blocks_equals_one_block():
    """Scoring a chunk's queries a few rows at a time (bounded memory) gives the same peaks as all at once."""
    gen = torch.Generator().manual_seed(1)
    query, keys = torch.randn(1, 4, 33, 8, generator=gen), torch.randn(1, 2, 70, 8, generator=gen)
    whole = peak_attention(query, keys, 0.3, 37, block_elements=1 << 30)
    torch.testing.assert_close(peak_attention(query, keys, 0.3, 37), whole)
    torch.testing.assert_close(peak_attention(query, keys, 0.3, 37, block_elements=4 * 70 * 2), whole)
    torch.testing.assert_close(peak_attention(query, keys, 0.3, 37, block_elements=1), whole)


def test_method_scores_rank_by_key_scores_pooled_then_max_over_each_kv_heads_query_heads():
    """With key_scores set, Method.scores ignores the window: pooled key scores outside the window, max over the group."""
    gen = torch.Generator().manual_seed(2)
    key_scores = torch.rand(2, 3, 50, generator=gen)
    obs = LayerObservation(0, torch.arange(50).expand(2, -1), torch.rand(2, 3, 8, 50, generator=gen), key_scores=key_scores)
    method = make_method("snapkv")
    expected = pool_scores(key_scores[..., :42], method.kernel_size, method.pooling).amax(dim=1)
    torch.testing.assert_close(method.scores(obs), expected)
    assert method.scores(obs.drop_tail(5)).shape == (2, 37)


def test_only_methods_that_rank_by_scores_take_key_scores():
    """snapkv, pyramidkv, dynamickv and evidencekv rank by Method.scores; h2o and streamingllm override it and are refused."""
    takes = {name: make_method(name).takes_key_scores for name in ("snapkv", "pyramidkv", "dynamickv", "evidencekv", "h2o", "streamingllm")}
    assert takes == {"snapkv": True, "pyramidkv": True, "dynamickv": True, "evidencekv": True, "h2o": False, "streamingllm": False}


# --- repeat_scores on a tiny model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefix(model):
    """A 60-token prefix read with the full cache."""
    return prefill(model, ids(60, 0))


def test_repeat_scores_are_the_models_own_peak_attention_over_the_repeat(model, prefix):
    """One chunk's scores, per layer (num_kv_heads, group, prefix_len), equal the max over the repeat's queries of the
    attention probabilities transformers' eager attention computes for prefix + request + repeat in one sequence."""
    target = ids(60, 0)[:, 5:45]
    scores = repeat_scores(model, prefix, target, prompt_for, chunk_size=1000)
    assert [s.shape for s in scores] == [(2, 2, 60)] * 6
    assert all(0 <= float(s.min()) and float(s.max()) <= 1 for s in scores)
    sequence = torch.cat([ids(60, 0), prompt_for(0), target], dim=1)
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attentions = model(input_ids=sequence, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("kvcli")
    for layer, attn in enumerate(attentions):
        expected = attn[0, :, 60:, :60].amax(dim=1).reshape(2, 2, 60)  # (num_kv_heads, group, prefix_len)
        torch.testing.assert_close(scores[layer], expected, atol=1e-5, rtol=1e-4)


def test_scoring_leaves_the_prefix_cache_unchanged(model, prefix):
    """After repeating in chunks, every layer of the prefix holds the same positions, keys and values, and no fork."""
    before = prefix.cache.clone()
    repeat_scores(model, prefix, ids(60, 0)[:, 5:50], prompt_for, chunk_size=16)
    assert_same_cache(prefix.cache, before)
    assert all(layer.base is None for layer in prefix.cache.layers)


def test_chunks_are_repeats_of_the_prefix_each_on_its_own(model, prefix):
    """In chunks of 16, a chunk attends to the prefix and to itself only: the scores are the max, entry by entry,
    of one-chunk repeats of each chunk alone (so they differ from one 45-token chunk, whose later queries also see
    its earlier repeat tokens and positions)."""
    target = ids(60, 0)[:, 5:50]
    chunked = repeat_scores(model, prefix, target, prompt_for, chunk_size=16)
    alone = [repeat_scores(model, prefix, target[:, start : start + 16], lambda _, s=start: prompt_for(s), chunk_size=1000)
             for start in (0, 16, 32)]
    for layer, scores in enumerate(chunked):
        torch.testing.assert_close(scores, torch.stack([a[layer] for a in alone]).amax(dim=0))
    whole = repeat_scores(model, prefix, target, prompt_for, chunk_size=1000)
    assert not all(torch.allclose(a, b) for a, b in zip(chunked, whole))


# --- the reused prefix ranked by the repeat -------------------------------------------------------


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "dynamickv", "evidencekv"])
def test_repeat_prefix_keeps_exactly_the_budget_and_the_window(reader, name):
    """The compressed prefix keeps the budget over layers, the instruction window in every layer and head, and
    nothing of the repeat; the live read and the derive from one repeat keep the same cache."""
    options = Options(budget=Budget(ratio=0.3), max_new_tokens=4)
    mode = Reused(reader, words(300), options, scorer="repeat")
    method = make_method(name)
    live = mode.read(method)
    n = mode.prompt.prefix_len
    plan, _ = options.budget.plan(n, reader.num_layers, method.window_size)
    assert live.state.compressed and sum(live.state.cache.retained_per_layer()) == plan.total
    for layer in live.state.cache.layers:
        positions = layer.kept_positions()
        assert int(positions.max()) < n
        assert torch.equal(positions[:, -method.window_size :], torch.arange(n - method.window_size, n).expand(positions.shape[0], -1))
    assert_same_cache(live.state.cache, mode.derive(mode.repeat(), method).state.cache)
    assert live.extra["scorer"] == "repeat" and live.extra["repeat_s"] > 0 and live.extra["repeat_x_prefill"] > 0


@pytest.mark.parametrize("rescore", [0, 2])
def test_the_profile_split_keeps_the_budget_over_a_repeat_and_its_cut(reader, rescore):
    """snapkv with head_split=profile ranked by the repeat keeps the budget's entries exactly, with heads of unequal
    lengths, also over a cut whose layers hold different numbers of entries (rescore=2: DynamicKV's layer budgets);
    the live read and the derive keep the same cache."""
    options = Options(budget=Budget(ratio=0.15), max_new_tokens=4)
    mode = Reused(reader, words(300), options, scorer="repeat")
    method = make_method("snapkv", head_split="profile", kernel_size=1, rescore=rescore)
    derived = mode.derive(mode.repeat(), method)
    compression, _ = reader.compression(method, options.budget, mode.prompt.prefix_len, repeat=True)
    lengths = derived.state.cache.head_lengths()
    assert sum(map(sum, lengths)) == compression.plan.total * len(lengths[0])
    assert len({n for layer in lengths for n in layer}) > 1
    assert_same_cache(Reused(reader, words(300), options, scorer="repeat").read(method).state.cache, derived.state.cache)


def test_the_tokens_the_repeat_attends_to_most_are_kept(reader):
    """Without pooling, each layer and KV head keeps exactly its top repeat-scored entries outside the window (max
    over its query heads): the token the repeat needs most, a fact it must reproduce, is never dropped."""
    options = Options(budget=Budget(ratio=0.2), max_new_tokens=4)
    mode = Reused(reader, words(300), options, scorer="repeat")
    method = make_method("snapkv", kernel_size=1)
    repeated = mode.repeat()
    kept = mode.derive(repeated, method).state.cache
    n, window = mode.prompt.prefix_len, method.window_size
    for layer, scores in zip(kept.layers, repeated.scores):
        outside = scores[..., : n - window].amax(dim=1)  # (num_kv_heads, n - window)
        n_top = layer.length - window
        expected = outside.topk(n_top, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(layer.kept_positions()[:, :n_top], expected)
        for head in range(outside.shape[0]):
            assert int(outside[head].argmax()) in layer.kept_positions()[head].tolist()


def test_the_repeat_scorer_refuses_what_it_cannot_serve(reader):
    """h2o and streamingllm (which do not rank by attention scores), --chunk-size and an unknown scorer each fail in one line."""
    mode = Reused(reader, words(200), Options(budget=Budget(ratio=0.3)), scorer="repeat")
    for name in ("h2o", "streamingllm"):
        with pytest.raises(InputError, match=f"{name} keeps .*use snapkv, pyramidkv, dynamickv, evidencekv"):
            mode.read(make_method(name))
    chunked = Reused(reader, words(200), Options(budget=Budget(ratio=0.3), chunk_size=64), scorer="repeat")
    with pytest.raises(InputError, match="--chunk-size"):
        chunked.read(make_method("snapkv"))
    with pytest.raises(InputError, match="unknown scorer"):
        Reused(reader, words(20), Options(), scorer="questions")


def test_the_default_scorer_is_the_repeat_where_it_applies():
    """Without --scorer: repeat for methods that rank by scores (and full), the instruction for h2o, streamingllm and
    reads in chunks; an explicit repeat is checked against the method and the chunks."""
    assert [pick_scorer(None, make_method(n)) for n in ("snapkv", "dynamickv", "evidencekv", "full")] == ["repeat"] * 4
    assert [pick_scorer(None, make_method(n)) for n in ("h2o", "streamingllm")] == ["instruction"] * 2
    assert pick_scorer(None, make_method("snapkv"), chunk_size=512) == "instruction"
    assert pick_scorer("instruction", make_method("h2o")) == "instruction"
    with pytest.raises(InputError, match="--chunk-size"):
        pick_scorer("repeat", make_method("snapkv"), chunk_size=512)
    with pytest.raises(InputError, match="h2o keeps"):
        pick_scorer("repeat", make_method("h2o"))


def test_the_full_method_and_a_prompt_that_fits_skip_the_repeat(reader, monkeypatch):
    """Nothing to rank, nothing repeated: full, or a budget the prompt already fits, reads the prefix once."""
    import kvcli.reading.prefix

    monkeypatch.setattr(kvcli.reading.prefix, "repeat_prefix", lambda *a, **k: pytest.fail("repeated"))
    mode = Reused(reader, words(100), Options(budget=Budget(ratio=1.0)), scorer="repeat")
    assert not mode.read(make_method("full")).state.compressed
    assert not mode.read(make_method("snapkv")).state.compressed


# --- a second repeat over a cut of the prefix (--param rescore) ---------------------------------------


def test_first_cut_keeps_rescore_times_the_budget_with_dynamickvs_layers_and_equal_heads():
    """The cut before the second repeat: R x the budget, DynamicKV's layer budgets with heads equal (dense layers for
    the repeat), the method's window and pooling; none without rescore or when the cut would keep every entry."""
    plan = BudgetPlan(num_layers=4, prompt_len=100, total=40)
    method = make_method("snapkv", head_split="global", kernel_size=1, window_size=4, rescore=2.5)
    cut = first_cut(Compression(method, plan))
    assert cut.method.name == "dynamickv" and cut.method.head_split == "equal" and cut.method.rescore == 0
    assert (cut.method.kernel_size, cut.method.window_size, cut.method.pooling) == (1, 4, "avg")
    assert cut.plan == BudgetPlan(num_layers=4, prompt_len=100, total=100)
    assert first_cut(Compression(make_method("snapkv"), plan)) is None
    assert first_cut(Compression(make_method("snapkv", rescore=10), plan)) is None  # 400 entries: the whole prefix


def test_a_rescored_cache_keeps_the_budget_by_a_second_repeat_over_the_first_cut(reader):
    """With rescore=2 the prefix is cut to twice the budget by the first repeat, the document is repeated again over
    that cut (the same request and chunks: over the uncut prefix it gives the first repeat's scores), and the budget
    is kept by the second repeat's scores, within the cut: the live read and the derive keep that same cache, the
    exact budget, and say two repeats were run."""
    options = Options(budget=Budget(ratio=0.15), max_new_tokens=4)
    mode = Reused(reader, words(300), options, scorer="repeat")
    method = make_method("dynamickv", head_split="adaptive", head_floor=0.2, kernel_size=1, rescore=2)
    repeated = mode.repeat()
    n = mode.prompt.prefix_len
    for layer, (first, again) in enumerate(zip(repeated.scores, repeated.again(repeated.state))):
        torch.testing.assert_close(again, first)
    cuts = []
    again = repeated.again
    repeated.again = lambda cut: cuts.append(cut.cache.clone()) or again(cut)
    derived = mode.derive(repeated, method)
    compression, _ = reader.compression(method, options.budget, n, repeat=True)
    cut = repeated.state.cache.clone()
    keep_by_scores(cut, repeated.scores, first_cut(compression))
    assert len(cuts) == 1
    assert_same_cache(cuts[0], cut)
    by_hand = cut.clone()
    keep_by_scores(by_hand, again(Prefill(cache=cut, logits=None, prompt_len=repeated.state.prompt_len, seconds=0.0)), compression)
    assert_same_cache(derived.state.cache, by_hand)
    assert sum(derived.state.cache.retained_per_layer()) == compression.plan.total == round(0.15 * n * reader.num_layers)
    for kept, within in zip(derived.state.cache.layers, cut.layers):
        for head, positions in enumerate(kept.head_positions()):
            assert set(positions.tolist()) <= set(within.kept_positions()[head].tolist())
    once = mode.derive(repeated, make_method("dynamickv", head_split="adaptive", head_floor=0.2, kernel_size=1))
    assert sum(once.state.cache.retained_per_layer()) == compression.plan.total
    assert any(not torch.equal(a, b) for one, two in zip(once.state.cache.layers, derived.state.cache.layers)
               for a, b in zip(one.head_positions(), two.head_positions()))  # the second repeat chose otherwise
    assert derived.extra["repeats"] == 2 and "repeats" not in once.extra
    repeated.again = again
    assert_same_cache(Reused(reader, words(300), options, scorer="repeat").read(method).state.cache, derived.state.cache)


# --- each token's surprisal weighs the repeat's scores (--param surprisal) -----------------------------


@pytest.mark.parametrize(("block", "vocab_rows"), [(None, 1 << 14), (512, 1 << 14), (7, 50), (3, 7)])
def test_token_surprisal_is_the_models_own_next_token_loss(reader, block, vocab_rows):
    """From the decoder's hidden states of a prefill (the one kvcli reads with, last logits only), each token's
    surprisal equals the cross-entropy of the model's own full logits at the position before it, in blocks of any
    size and with the output layer read in slices of any number of vocabulary rows (the last one short: 64 = 50 + 14,
    9 x 7 + 1); the first token, which nothing predicts, gets the largest."""
    model = reader.model
    prompt = ids(40, 3) % model.config.vocab_size
    prepare_model(model)  # probed before the decoder is watched, as repeat_prefix does
    with _decoder_outputs(model) as seen:
        prefill(model, prompt)
    assert len(seen) == 1 and seen[0].shape[:2] == (1, 40)
    surprisal = token_surprisal(model, prompt, seen[0], block=block, vocab_rows=vocab_rows)
    with torch.inference_mode():
        logits = model(input_ids=prompt, use_cache=False).logits[0].float()  # (40, vocab), every position
    expected = torch.nn.functional.cross_entropy(logits[:-1], prompt[0, 1:], reduction="none")
    torch.testing.assert_close(surprisal[1:], expected, rtol=1e-4, atol=1e-4)
    assert surprisal[0] == surprisal[1:].max()
    assert surprisal.shape == (40,) and surprisal.dtype == torch.float32
    with _decoder_outputs(model):
        pass
    assert not model.get_decoder()._forward_hooks  # the hook is removed


def test_weigh_multiplies_each_entry_by_its_tokens_weight():
    """Entry j's scores times weights[j] in every head; a layer not scored (sliding) stays None; no weights: the
    scores themselves."""
    scores = [torch.arange(30.0).view(2, 3, 5), None]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    weighed = weigh(scores, weights)
    assert weighed[1] is None
    for head in range(2):
        for query in range(3):
            assert torch.equal(weighed[0][head, query], scores[0][head, query] * weights)
    assert weigh(scores, None) is scores


@pytest.mark.parametrize("rescore", [0, 2])
def test_surprisal_weighs_both_repeats_scores_before_the_method_keeps_its_budget(reader, rescore):
    """--param surprisal=E: the derive keeps what the method keeps from the repeat's scores times (1 + surprisal) ** E
    (with rescore, the cut by the weighed first scores, then the budget by the second repeat's own), the same budget,
    other entries than the scores alone; the live read keeps the same cache."""
    options = Options(budget=Budget(ratio=0.15), max_new_tokens=4)
    mode = Reused(reader, words(300), options, scorer="repeat")
    repeated = mode.repeat()
    n = mode.prompt.prefix_len
    assert repeated.surprisal_s == 0 and repeated.measure is not None  # not measured until a method weighs by it
    mode.derive(repeated, make_method("dynamickv", kernel_size=1, rescore=rescore))
    assert repeated.surprisal_s == 0
    surprisal = repeated.surprisal()
    assert surprisal.shape == (n,) and bool((surprisal >= 0).all()) and repeated.surprisal_s > 0 and repeated.measure is None
    assert repeated.surprisal() is surprisal  # measured once
    plain = make_method("dynamickv", head_split="adaptive", head_floor=0.2, kernel_size=1, rescore=rescore)
    method = make_method("dynamickv", head_split="adaptive", head_floor=0.2, kernel_size=1, rescore=rescore, surprisal=0.5)
    derived = mode.derive(repeated, method)
    compression, _ = reader.compression(method, options.budget, n, repeat=True)
    weights = (1 + surprisal) ** 0.5
    by_hand = repeated.state.cache.clone()
    scores = weigh(repeated.scores, weights)
    if rescore:
        keep_by_scores(by_hand, scores, first_cut(compression))
        scores = repeated.again(Prefill(cache=by_hand, logits=None, prompt_len=n, seconds=0.0))
    keep_by_scores(by_hand, scores, compression)
    assert_same_cache(derived.state.cache, by_hand)
    assert sum(derived.state.cache.retained_per_layer()) == compression.plan.total
    alone = mode.derive(repeated, plain).state.cache
    assert any(not torch.equal(a, b) for one, two in zip(alone.layers, derived.state.cache.layers)
               for a, b in zip(one.head_positions(), two.head_positions()))  # the weights chose otherwise
    assert_same_cache(Reused(reader, words(300), options, scorer="repeat").read(method).state.cache, derived.state.cache)


@pytest.fixture
def order(monkeypatch) -> list[str]:
    """What the repeat did, in order: "watched" (the decoder's outputs kept), "surprisal" (measured), "repeat" (a pass)."""
    import kvcli.repeat

    done: list[str] = []
    real_surprisal, real_repeat, real_watch = kvcli.repeat.token_surprisal, kvcli.repeat._repeat, kvcli.repeat._decoder_outputs
    monkeypatch.setattr(kvcli.repeat, "token_surprisal", lambda *a, **k: done.append("surprisal") or real_surprisal(*a, **k))
    monkeypatch.setattr(kvcli.repeat, "_repeat", lambda *a, **k: done.append("repeat") or real_repeat(*a, **k))
    monkeypatch.setattr(kvcli.repeat, "_decoder_outputs", lambda *a: done.append("watched") or real_watch(*a))
    return done


@pytest.mark.parametrize("weighs", [False, True])
def test_a_read_measures_the_surprisal_before_its_repeat_or_never(reader, order, weighs):
    """A read knows its method: one that weighs by surprisal measures it right after the prefill, before the
    repeat pass, and holds no hidden states through the repeat; one that does not never watches the decoder."""
    method = make_method("dynamickv", kernel_size=1, surprisal=0.5 if weighs else 0.0)
    prefix = Reused(reader, words(300), Options(budget=Budget(ratio=0.15), max_new_tokens=4), scorer="repeat").read(method)
    assert order == (["watched", "surprisal", "repeat"] if weighs else ["repeat"])
    assert ("surprisal_s" in prefix.extra) == weighs


# --- eval and the command line --------------------------------------------------------------------


def test_eval_compares_both_scorers_side_by_side(reader):
    """--modes reuse,reuse-repeat scores each method both ways in one run, against one full cache, and times the repeat."""
    methods = [make_method(n) for n in ("full", "snapkv", "dynamickv")]
    settings = settings_for(methods, None, [0.3], ("reuse", "reuse-repeat"))
    assert [(s.method, s.mode) for s in settings] == [
        ("full", "reuse"), ("snapkv", "reuse"), ("dynamickv", "reuse"), ("snapkv", "reuse-repeat"), ("dynamickv", "reuse-repeat")]
    with pytest.raises(InputError, match="h2o keeps"):
        settings_for([make_method("h2o")], None, [0.3], ("reuse-repeat",))
    rows = [Row("a", words(200), "w5?", ["w5"])]
    config = EvalConfig(methods=methods, budgets=None, ratios=[0.3], metric="contains", max_new_tokens=3, modes=("reuse", "reuse-repeat"))
    result = run_eval(reader, rows, config)
    assert {(s["method"], s["mode"]) for s in result.summary} == {(s.method, s.mode) for s in settings}
    assert result.timing["repeat_s"] > 0 and result.timing["repeat_prefill_s"] > 0



@pytest.mark.parametrize("weighs", [False, True])
def test_eval_measures_the_surprisal_with_its_repeat_only_where_a_method_weighs(reader, order, weighs):
    """eval's reuse-repeat capture, which serves every method, measures the surprisal right after its prefill when
    any method weighs by it (no hidden states held through the repeat) and watches nothing when none does; the
    weighed setting answers as the live read (`kvcli ask --reuse`) of the same method does."""
    method = make_method("dynamickv", kernel_size=1, surprisal=0.5 if weighs else 0.0)
    rows = [Row("a", words(300), "w5?", ["w5"])]
    config = EvalConfig(methods=[make_method("full"), method], budgets=None, ratios=[0.15], metric="contains",
                        max_new_tokens=3, modes=("reuse-repeat",))
    result = run_eval(reader, rows, config)
    assert order == (["watched", "surprisal", "repeat"] if weighs else ["repeat"])
    options = Options(budget=Budget(ratio=0.15), max_new_tokens=3)
    live = Reused(reader, words(300), options, scorer="repeat").read(method)
    expected = answer(reader, live.ask(reader, "w5?", options), options).text
    assert expected and [s["prediction"] for s in result.samples if s["method"] == "dynamickv"] == [expected]

def test_compress_with_the_repeat_scorer_says_so(reader, tmp_path, monkeypatch):
    """kvcli compress --scorer repeat saves the cache and reports the scorer and the repeat's cost, ask --reuse scores
    by the repeat by default; --scorer without --reuse and the repeat scorer with h2o are one-line errors."""
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    folder = str(save_tiny_llama(tmp_path / "tiny", max_positions=1024))
    doc = tmp_path / "doc.txt"
    doc.write_text(words(300))
    runner = CliRunner()
    done = runner.invoke(app, ["compress", str(doc), "-o", str(tmp_path / "d.kvc"), "-m", folder, "--method", "snapkv",
                               "--ratio", "0.3", "--scorer", "repeat", "--json"])
    assert done.exit_code == 0, done.stderr
    extra = json.loads(done.stdout)["stats"]["extra"]
    assert extra["scorer"] == "repeat" and extra["repeat_s"] > 0 and "repeat_x_prefill" in extra
    asked = runner.invoke(app, ["ask", str(doc), "w1?", "--reuse", "-m", folder, "--method", "snapkv", "--ratio", "0.3",
                                "--max-new-tokens", "2", "--json"])
    assert asked.exit_code == 0, asked.stderr
    assert json.loads(asked.stdout)["stats"]["extra"]["scorer"] == "repeat"  # the default
    for args, words_in_error in ((["ask", str(doc), "w1?", "--scorer", "repeat"], "--reuse"),
                                 (["compress", str(doc), "-o", str(tmp_path / "e.kvc"), "--method", "h2o", "--scorer", "repeat"], "h2o")):
        failed = runner.invoke(app, [*args, "-m", folder])
        lines = [line for line in failed.stderr.splitlines() if line.strip()]
        assert failed.exit_code == 2 and len(lines) == 1 and words_in_error in lines[0], failed.stderr
