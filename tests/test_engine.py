"""The engine on a tiny random grouped-query Llama built in-process: exact decoding, live = replayed compression."""

from __future__ import annotations

import pytest
import torch

from kvcli.generate import capture, decode, forward, prefill
from kvcli.methods import REGISTRY, make_method, plan_budget
from methodutil import assert_same_cache, build, squeeze, tiny_llama

NUM_LAYERS = 6
PROMPT_LEN = 80
RATIO = 0.25


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model():
    """A random grouped-query Llama: 6 layers, 4 query heads sharing 2 KV heads."""
    return tiny_llama(NUM_LAYERS)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def captured(tiny_model, prompt):
    window = max(cls().window_size for cls in REGISTRY.values())
    return capture(tiny_model, prompt, window, accumulated=True)


def plan_for(method):
    return plan_budget(PROMPT_LEN, NUM_LAYERS, window_size=method.window_size, ratio=RATIO)


def test_full_cache_decode_matches_generate(tiny_model, prompt):
    """With the full cache, prefill + decode gives model.generate's greedy tokens, token for token."""
    with torch.inference_mode():
        # An explicit mask: otherwise generate treats prompt tokens equal to pad_token_id as padding.
        output = tiny_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = output[0, PROMPT_LEN:].tolist()
    state = prefill(tiny_model, prompt, squeeze(make_method("full"), None))
    assert list(decode(tiny_model, state, 12, set())) == expected
    assert len(set(expected)) > 3, "the tiny model should not just repeat one token"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_live_prefill_equals_replayed_capture(tiny_model, prompt, captured, name):
    """Compressing live during prefill keeps the same positions, keys and values per layer and head as Capture.derive, and decodes the same tokens."""
    method = build(name, NUM_LAYERS, tiny_model.config.num_attention_heads)
    plan = plan_for(method)
    live = prefill(tiny_model, prompt, squeeze(method, plan))
    derived = captured.derive(squeeze(method, plan))
    assert live.compressed == derived.compressed == method.compresses
    assert_same_cache(live.cache, derived.cache)
    if method.compresses:
        assert sum(live.cache.retained_per_layer()) == plan.total
    assert torch.allclose(live.logits, derived.logits, atol=1e-5)
    assert list(decode(tiny_model, live, 8, set())) == list(decode(tiny_model, derived, 8, set()))


def test_dynamickv_layers_differ_in_length(tiny_model, prompt):
    """dynamickv leaves layers of different lengths in the cache, summing to the budget."""
    method = make_method("dynamickv")
    plan = plan_for(method)
    retained = prefill(tiny_model, prompt, squeeze(method, plan)).cache.retained_per_layer()
    assert len(set(retained)) > 1
    assert sum(retained) == plan.total


@pytest.mark.parametrize("name", list(REGISTRY))
def test_multi_token_feed_matches_one_at_a_time(tiny_model, prompt, captured, name):
    """Feeding 5 tokens at once into a (compressed) cache gives the same last logits as feeding them one by one."""
    method = build(name, NUM_LAYERS, tiny_model.config.num_attention_heads)
    plan = plan_for(method)
    together = prefill(tiny_model, prompt, squeeze(method, plan)).cache
    one_by_one = captured.derive(squeeze(method, plan)).cache
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits_together = forward(tiny_model, together, ids, PROMPT_LEN)
        for i in range(5):
            logits_single = forward(tiny_model, one_by_one, ids[:, i : i + 1], PROMPT_LEN + i)
    assert together.retained_per_layer() == one_by_one.retained_per_layer()
    assert torch.allclose(logits_together, logits_single, atol=1e-4)


@pytest.mark.parametrize("name", [name for name, cls in REGISTRY.items() if cls.compresses])
def test_chunked_prefill_meets_budget(tiny_model, prompt, name):
    """Chunked prefill with a probe keeps exactly the plan's total, the prompt's last window in every layer, and no probe entry."""
    method = build(name, NUM_LAYERS, tiny_model.config.num_attention_heads)
    plan = plan_for(method)
    probe = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    state = prefill(tiny_model, prompt, squeeze(method, plan), chunk_size=24, probe_ids=probe)
    assert sum(state.cache.retained_per_layer()) == plan.total
    window = torch.arange(PROMPT_LEN - method.window_size, PROMPT_LEN)
    for layer in state.cache.layers:
        positions = layer.kept_positions()
        assert torch.equal(positions[:, -method.window_size :], window.expand(positions.shape[0], -1))
        assert (positions < PROMPT_LEN).all() and (positions[:, 1:] > positions[:, :-1]).all()


QUESTION = 20  # the prompt's last tokens taken as the question in the tests below


@pytest.mark.parametrize("name", [name for name, cls in REGISTRY.items() if cls.compresses])
def test_question_kept_whole_beside_the_budget(tiny_model, prompt, captured, name):
    """A compression told the prompt ends in a question keeps all of it in every layer and head, beside the
    plan's total, its tokens before the window never candidates; live and replayed keep the same cache."""
    from dataclasses import replace

    method = build(name, NUM_LAYERS, tiny_model.config.num_attention_heads)
    plan = plan_budget(PROMPT_LEN - (QUESTION - method.window_size), NUM_LAYERS, window_size=method.window_size, ratio=RATIO)
    compression = replace(squeeze(method, plan), question=QUESTION)
    assert compression.kept_whole == QUESTION - method.window_size
    live = prefill(tiny_model, prompt, compression)
    derived = captured.derive(compression)
    assert_same_cache(live.cache, derived.cache)
    extra = QUESTION - method.window_size
    assert sum(live.cache.retained_per_layer()) == plan.total + extra * NUM_LAYERS
    question = torch.arange(PROMPT_LEN - QUESTION, PROMPT_LEN)
    for layer in live.cache.layers:
        for positions in layer.head_positions():
            assert torch.equal(positions[-QUESTION:], question) and (positions[1:] > positions[:-1]).all()
    assert list(decode(tiny_model, live, 8, set())) == list(decode(tiny_model, derived, 8, set()))
    # without the question's tokens before the window to keep, the same plan keeps fewer of them
    plain = prefill(tiny_model, prompt, squeeze(method, plan)).cache
    assert sum(plain.retained_per_layer()) == plan.total
    assert any(not torch.isin(question, positions).all() for layer in plain.layers for positions in layer.head_positions())


@pytest.mark.parametrize("split", ["adaptive", "global", "profile"])
def test_question_kept_whole_with_unequal_heads(tiny_model, prompt, captured, split):
    """Under a per-head split the question is kept whole in every head too, each head still sorted."""
    from dataclasses import replace

    method = make_method("snapkv", head_split=split)
    plan = plan_budget(PROMPT_LEN - (QUESTION - method.window_size), NUM_LAYERS, window_size=method.window_size, ratio=RATIO)
    cache = captured.derive(replace(squeeze(method, plan), question=QUESTION)).cache
    question = torch.arange(PROMPT_LEN - QUESTION, PROMPT_LEN)
    for layer in cache.layers:
        for positions in layer.head_positions():
            assert torch.equal(positions[-QUESTION:], question) and (positions[1:] > positions[:-1]).all()
    assert sum(sum(lengths) for lengths in cache.head_lengths()) == (plan.total + (QUESTION - method.window_size) * NUM_LAYERS) * 2


def test_question_kept_whole_at_the_last_chunk_only(tiny_model, prompt):
    """A chunked read keeps the question whole after its last chunk; the probes fed after earlier chunks are never kept."""
    from dataclasses import replace

    method = make_method("snapkv")
    plan = plan_budget(PROMPT_LEN - (QUESTION - method.window_size), NUM_LAYERS, window_size=method.window_size, ratio=RATIO)
    compression = replace(squeeze(method, plan), question=QUESTION)
    probe = prompt[:, -QUESTION:]
    state = prefill(tiny_model, prompt, compression, chunk_size=24, probe_ids=probe, tail=QUESTION)
    assert sum(state.cache.retained_per_layer()) == plan.total + (QUESTION - method.window_size) * NUM_LAYERS
    for layer in state.cache.layers:
        positions = layer.kept_positions()
        assert torch.equal(positions[:, -QUESTION:], torch.arange(PROMPT_LEN - QUESTION, PROMPT_LEN).expand(2, -1))
        assert (positions < PROMPT_LEN).all() and (positions[:, 1:] > positions[:, :-1]).all()
