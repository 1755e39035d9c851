"""Per-head budgets: KV heads of one layer holding different numbers of entries, stored without padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcli.attention import LayerAttention, attend, attend_heads
from kvcli.cache import KVCache, KVLayer
from kvcli.errors import BudgetError, InputError
from kvcli.generate import capture, decode, forward, new_cache, prefill
from kvcli.methods import configure, make_method, plan_budget
from kvcli.methods.base import keep_global, keep_split
from kvcli.reindex import Reindexer
from kvcli.rope import rotary_layout
from kvcli.stats import heads_summary
from kvcli.step import Step
from kvcli.store import load_cache, save_cache
from methodutil import squeeze, tiny_llama

NUM_KV_HEADS, HEAD_DIM = 2, 4
META = {"model": "m", "config_hash": "abc", "weights_fingerprint": "w1", "dtype": "float32", "method": "snapkv",
        "method_params": {}, "prompt_tokens": 40}

pytestmark = pytest.mark.usefixtures("one_thread")


def states(q_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(1, NUM_KV_HEADS, q_len, HEAD_DIM)` whose entries encode (head, position)."""
    head = torch.arange(NUM_KV_HEADS)[:, None, None] * 1000.0
    position = torch.arange(offset, offset + q_len)[None, :, None].float()
    keys = (head + position).expand(NUM_KV_HEADS, q_len, HEAD_DIM)[None].clone()
    return keys, -keys


def packed_layer(n: int = 20, kept=((0, 5, 19), (1, 2, 3, 4, 8, 9, 19))) -> KVLayer:
    layer = KVLayer()
    layer.append(*states(n), torch.arange(n))
    layer.keep_positions([torch.tensor(k) for k in kept])
    return layer


def test_unequal_heads_are_packed_and_hold_the_sum_of_their_lengths():
    """Keeping different numbers per head stores each head's entries exactly: bytes are the sum of the head lengths, no padding."""
    layer = packed_layer()
    assert layer.packed and layer.head_lengths() == [3, 7] and layer.mean_length() == 5
    entry = 2 * HEAD_DIM * 4  # keys and values of one head, float32
    assert layer.nbytes() == (3 + 7) * entry
    assert layer.entry_nbytes() == NUM_KV_HEADS * entry  # one token over every head, as for a dense layer
    for h, kept in enumerate(([0, 5, 19], [1, 2, 3, 4, 8, 9, 19])):
        keys, values, positions, _ = layer.head_entries(h)
        assert keys.shape == (1, 1, len(kept), HEAD_DIM) and positions.tolist() == kept
        assert keys[0, 0, :, 0].tolist() == [h * 1000.0 + p for p in kept] and torch.equal(values, -keys)
    with pytest.raises(Exception, match="per head"):
        layer.view()


def test_equal_heads_stay_dense():
    """Per-head lists of equal lengths keep the dense (1, H, n, D) layout, as the equal split always did."""
    layer = KVLayer()
    layer.append(*states(10), torch.arange(10))
    layer.keep_positions([torch.tensor([0, 9]), torch.tensor([3, 9])])
    assert not layer.packed and layer.view()[0].shape == (1, NUM_KV_HEADS, 2, HEAD_DIM)
    assert layer.kept_positions().tolist() == [[0, 9], [3, 9]]


def test_a_packed_layer_pruned_to_equal_heads_is_dense_again():
    """A packed layer whose heads are pruned to equal lengths goes back to the dense layout, entries intact."""
    layer = packed_layer()
    layer.keep_positions([torch.tensor([5, 19]), torch.tensor([8, 19])])
    assert not layer.packed and layer.kept_positions().tolist() == [[5, 19], [8, 19]]
    assert layer.view()[0][0, :, :, 0].tolist() == [[5.0, 19.0], [1008.0, 1019.0]]


def padded_reference(query, heads, attn: LayerAttention) -> torch.Tensor:
    """Attention over the heads padded at the front to the longest and masked, in float64."""
    _, num_heads, q_len, _ = query.shape
    group = num_heads // len(heads)
    longest = max(k.shape[2] for k, _ in heads)
    out = torch.empty(1, q_len, num_heads, heads[0][1].shape[-1], dtype=torch.float64)
    for j in range(num_heads):
        key, value = heads[j // group]
        n = key.shape[2]
        pad = longest - n
        keys = torch.cat([torch.zeros(pad, key.shape[3], dtype=torch.float64), key[0, 0].double()])
        values = torch.cat([torch.zeros(pad, value.shape[3], dtype=torch.float64), value[0, 0].double()])
        logits = query[0, j].double() @ keys.T * attn.scaling  # (q_len, longest)
        rows = torch.arange(q_len)[:, None] + (longest - q_len)
        visible = (torch.arange(longest)[None, :] <= rows) & (torch.arange(longest)[None, :] >= pad)
        logits = logits.masked_fill(~visible, float("-inf"))
        if attn.sinks is not None:
            logits = torch.cat([logits, attn.sinks[j].double().expand(q_len, 1)], dim=1)
        probs = logits.softmax(dim=-1)[:, :longest]
        out[0, :, j] = probs @ values
    return out


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("sinks", [False, True])
def test_attention_over_packed_heads_equals_padded_and_masked(q_len, sinks):
    """Each KV head attending over its own entries gives what attention over the heads padded to the longest and masked gives."""
    gen = torch.Generator().manual_seed(0)
    heads = [(torch.randn(1, 1, n, 8, generator=gen), torch.randn(1, 1, n, 8, generator=gen)) for n in (5, 11)]
    query = torch.randn(1, 4, q_len, 8, generator=gen)
    attn = LayerAttention(scaling=8**-0.5, sinks=torch.randn(4, generator=gen) if sinks else None)
    out = attend_heads(query, heads, attn)
    assert out.shape == (1, q_len, 4, 8)
    torch.testing.assert_close(out.double(), padded_reference(query, heads, attn), atol=1e-5, rtol=0)


def test_attention_over_equal_packed_heads_equals_dense_attention():
    """Heads of equal length attended one at a time give the dense layout's attention."""
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 9, 8, generator=gen), torch.randn(1, 2, 9, 8, generator=gen)
    query = torch.randn(1, 4, 3, 8, generator=gen)
    heads = [(keys[:, h : h + 1], values[:, h : h + 1]) for h in range(2)]
    torch.testing.assert_close(attend_heads(query, heads, 0.3), attend(query, keys, values, 0.3), atol=1e-6, rtol=0)


def test_decode_appends_one_entry_to_every_head():
    """A decode step through the cache appends the new token to every head of a packed layer and hands the model no padded keys."""
    cache = KVCache(1)
    cache.layers[0] = packed_layer()
    before = cache.nbytes()
    cache.reserve(5)  # room in every head, exactly: the appends then write in place
    assert [head.capacity for head in cache.layers[0].heads] == [3 + 5, 7 + 5]
    step = Step(cache=cache, positions=torch.tensor([20]))
    with cache.feeding(step):
        keys, values = cache.update(*states(1, offset=20), 0)
    assert keys.shape[2] == 0 and values.shape[2] == 0
    layer = cache.layers[0]
    assert layer.head_lengths() == [4, 8] and cache.nbytes() == before + layer.entry_nbytes()
    assert [p.tolist()[-1] for p in layer.head_positions()] == [20, 20]
    assert layer.head_entries(1)[0][0, 0, -1, 0] == 1020.0
    assert [head.capacity for head in layer.heads] == [3 + 5, 7 + 5]


def expected_head(layer_before: KVLayer, h: int, new_positions: list[int]) -> tuple[list[int], torch.Tensor]:
    """Head h's positions and keys after `new_positions` were appended to what `layer_before` held."""
    keys, _, positions, _ = layer_before.head_entries(h)
    new_keys = states(len(new_positions), offset=new_positions[0])[0][:, h : h + 1] if new_positions else keys[:, :, :0]
    return positions.tolist() + new_positions, torch.cat([keys, new_keys], dim=2)


def test_decode_steps_append_to_every_head_in_one_pooled_buffer():
    """A packed layer's heads live one after another in one buffer per layer: decode steps within the
    reserved room write in place (the same buffer), past it the heads move to a larger one, and
    every head holds exactly its own entries and the new ones, as per-head appends would."""
    layer = packed_layer()
    before = packed_layer()
    layer.reserve_more(3)
    pool = layer._pool
    assert pool is not None and pool.keys.shape[2] == (3 + 3) + (7 + 3)  # the sum of each head's length and room
    for position in range(20, 23):
        layer.append(*states(1, offset=position), torch.tensor([position]))
    assert layer._pool is pool  # written in place
    layer.append(*states(2, offset=23), torch.tensor([23, 24]))  # past the room: pooled again, larger
    assert layer._pool is not pool and layer.head_lengths() == [3 + 5, 7 + 5] and layer.length == 12
    assert layer.nbytes() == (8 + 12) * HEAD_DIM * 2 * 4
    for h in range(2):
        positions, keys = expected_head(before, h, list(range(20, 25)))
        got_keys, got_values, got_positions, _ = layer.head_entries(h)
        assert got_positions.tolist() == positions
        assert torch.equal(got_keys, keys) and torch.equal(got_values, -keys)


def test_a_pooled_layer_takes_a_reindexed_step_and_a_per_head_keep():
    """A re-indexed step records where RoPE placed every head's entries; a head kept anew after
    pooling is pooled again before the next step, with nothing lost or doubled."""
    layer = packed_layer()
    layer.append(*states(1, offset=20), torch.tensor([20]))  # pooled, not re-indexed
    assert layer._pool.rope is None
    layer.append(*states(1, offset=21), torch.tensor([21]), rope_positions=torch.tensor([9]))
    assert [r.tolist()[-2:] for r in (layer.head_entries(h)[3] for h in range(2))] == [[20, 9], [20, 9]]
    assert layer.head_entries(0)[3].tolist()[:3] == [0, 5, 19]  # the earlier entries where they were placed
    layer.keep_positions([torch.tensor([0, 20, 21]), torch.tensor([1, 2, 3, 21])])
    layer.append(*states(1, offset=22), torch.tensor([22]), rope_positions=torch.tensor([10]))
    assert [layer.head_entries(h)[2].tolist() for h in range(2)] == [[0, 20, 21, 22], [1, 2, 3, 21, 22]]
    assert [layer.head_entries(h)[3].tolist() for h in range(2)] == [[0, 20, 9, 10], [1, 2, 3, 9, 10]]
    assert torch.equal(layer.head_entries(1)[0][0, 0, :, 0], torch.tensor([1001.0, 1002.0, 1003.0, 1021.0, 1022.0]))


def test_fork_of_a_packed_layer_copies_only_when_written():
    """A fork of a packed cache reads as its base, holds no bytes of its own, and a step copies each head without changing the base."""
    base = KVCache(1)
    base.layers[0] = packed_layer()
    before = [e[0].clone() for e in (base.layers[0].head_entries(h) for h in range(2))]
    fork = base.fork()
    assert fork.nbytes() == 0 and fork.layers[0].head_lengths() == [3, 7]
    step = Step(cache=fork, positions=torch.tensor([20, 21]))
    with fork.feeding(step):
        fork.update(*states(2, offset=20), 0)
    assert fork.layers[0].head_lengths() == [5, 9] and base.layers[0].head_lengths() == [3, 7]
    for h in range(2):
        assert torch.equal(base.layers[0].head_entries(h)[0], before[h])
        assert fork.layers[0].head_positions()[h].tolist()[-2:] == [20, 21]
    clone = fork.clone()
    assert clone.layers[0].head_lengths() == [5, 9] and clone.nbytes() == fork.nbytes()


def test_reindexing_packs_each_head_right_before_the_next_chunk():
    """Re-indexing a packed layer places each head's entries at the positions right before P, P the most any head holds."""
    cache = KVCache(2)
    cache.layers[0] = packed_layer()
    cache.layers[1].append(*states(4), torch.arange(4))
    top = Reindexer([None, None]).pack(cache)
    assert top == 7
    assert [head.rope_positions()[0].tolist() for head in cache.layers[0].heads] == [[4, 5, 6], list(range(0, 7))]
    assert cache.layers[1].rope_positions()[0].tolist() == [3, 4, 5, 6]


def test_a_packed_cache_round_trips_through_a_kvc_file(tmp_path):
    """A .kvc keeps each head's entries of a packed layer exactly, with the bytes of the kept entries only."""
    cache = KVCache(2)
    cache.layers[0] = packed_layer()
    cache.layers[1].append(*states(4), torch.arange(4))
    path = tmp_path / "doc.kvc"
    save_cache(path, cache, META)
    loaded = load_cache(path, "abc", "m", weights_fingerprint="w1").cache
    assert loaded.layers[0].packed and loaded.layers[0].head_lengths() == [3, 7] and not loaded.layers[1].packed
    for h in range(2):
        for a, b in zip(cache.layers[0].head_entries(h), loaded.layers[0].head_entries(h)):
            assert torch.equal(a, b)
    assert loaded.nbytes() == cache.nbytes()
    assert path.stat().st_size < cache.nbytes() + 4096  # the tensors hold no padding (the rest: header and positions)


def test_a_format_3_file_still_loads():
    """A .kvc written by kvcli's format 3 (before packed layers; tests/data/format3.kvc) loads as before."""
    saved = load_cache(Path(__file__).parent / "data" / "format3.kvc", "abc", "m", weights_fingerprint="w1")
    assert saved.meta["format_version"] == 3 and saved.cache.retained_per_layer() == [5, 8, 11]
    assert not any(layer.packed for layer in saved.cache.layers)


def test_head_lengths_that_do_not_add_up_are_refused(tmp_path, monkeypatch):
    """A packed layer whose head lengths do not match its entries (checksum intact) is refused as damaged, in one line."""
    import kvcli.store as store

    cache = KVCache(1)
    cache.layers[0] = packed_layer()
    written = store._packed_tensors

    def wrong(i, layer, dtype):
        tensors = written(i, layer, dtype)
        tensors[f"layer.{i}.head_lengths"] = torch.tensor([3, 6], dtype=torch.int32)
        return tensors

    monkeypatch.setattr(store, "_packed_tensors", wrong)
    path = tmp_path / "doc.kvc"
    save_cache(path, cache, META)
    with pytest.raises(InputError, match="corrupted .layer 0's heads do not add up"):
        load_cache(path, "abc", "m")


def test_adaptive_split_takes_the_top_scores_of_all_heads():
    """The adaptive split keeps the layer's n_kept x heads entries: every head its window, the rest the best scores of any head."""
    positions = torch.arange(12).expand(2, -1)
    scores = torch.zeros(2, 10)
    scores[1, [0, 3, 5, 7]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    scores[0, 9] = 2.5
    kept = keep_split(scores, 4, positions, window_size=2)  # 2 outside the window per head on average: 4 in all
    assert [k.tolist() for k in kept] == [[9, 10, 11], [0, 3, 5, 10, 11]]


def test_global_split_keeps_the_total_over_layers_and_heads():
    """The global split keeps total x heads entries over all layers, each head at least its window, the best scores anywhere."""
    positions = torch.arange(10).expand(2, -1)
    low, high = torch.zeros(2, 8), torch.zeros(2, 8)
    high[0] = torch.arange(1, 9).float()  # layer 1 head 0 holds every high score
    kept = keep_global([(low, positions), (high, positions)], total=2 * 5, window_size=2)
    lengths = [[len(k) for k in layer] for layer in kept]
    assert sum(map(sum, lengths)) == 2 * 5 * 2  # the budget's mean, over every layer and head
    assert kept[1][0].tolist() == list(range(10))  # all eight scored entries and the window
    assert min(map(min, lengths)) >= 2  # every head keeps its window


def test_a_head_floor_keeps_every_head_a_share_of_an_equal_split():
    """With head_floor, a head whose scores are all low still keeps that share of an equal split's
    entries (its own best), the others take the rest, and the layer keeps the same total."""
    positions = torch.arange(22).expand(2, -1)
    scores = torch.zeros(2, 20)
    scores[0] = torch.arange(100, 120).float()  # head 0 outscores head 1 everywhere
    scores[1, [4, 9]] = torch.tensor([2.0, 1.0])
    bare = keep_split(scores, 12, positions, window_size=2)  # 10 per head outside the window on average
    assert [len(k) for k in bare] == [22, 2]  # head 1: its window alone
    floored = keep_split(scores, 12, positions, window_size=2, head_floor=0.2)
    assert [len(k) for k in floored] == [20, 4]
    assert floored[1].tolist() == [4, 9, 20, 21]  # its own two best, then its window
    low = torch.zeros(2, 8)
    low[1, 3] = 1.0
    high = torch.arange(1, 17).float().reshape(2, 8)
    kept = keep_global([(low, positions[:, :10]), (high, positions[:, :10])], total=2 * 5, window_size=2, floors=[1, 1])
    lengths = [[len(k) for k in layer] for layer in kept]
    assert sum(map(sum, lengths)) == 2 * 5 * 2 and min(map(min, lengths)) >= 3  # window plus one, every head of every layer
    assert 3 in kept[0][1].tolist()  # layer 0 head 1's best


def test_a_head_floor_never_raises_an_entry_ruled_out():
    """An entry scored -inf (dynamickv: not held; evidencekv: kept already as shared) stays out under a floor."""
    from kvcli.methods.base import floored
    scores = torch.tensor([[3.0, float("-inf"), float("-inf"), 1.0]])
    assert floored(scores, 3).tolist() == [[float("inf"), float("-inf"), float("-inf"), float("inf")]]


def test_head_split_is_a_knob_with_its_choices():
    """head_split is a --param of the scoring methods; an unknown split or one a method cannot use is refused in one line."""
    assert configure(["snapkv"], ["head_split=adaptive"])[0].head_split == "adaptive"
    assert "head_split" in make_method("evidencekv").params() and "head_split" not in make_method("h2o").params()
    with pytest.raises(BudgetError, match="head_split=sideways"):
        configure(["snapkv"], ["head_split=sideways"])
    with pytest.raises(BudgetError, match="evidencekv splits heads equal, adaptive or profile"):
        make_method("evidencekv", head_split="global")
    with pytest.raises(BudgetError, match="dynamickv splits heads equal or adaptive"):
        make_method("dynamickv", head_split="profile")
    with pytest.raises(BudgetError, match="pyramidkv splits heads equal, adaptive or global"):
        make_method("pyramidkv", head_split="profile")
    assert make_method("snapkv", head_split="profile").needs_profile and not make_method("snapkv").needs_profile
    assert make_method("evidencekv").needs_profile
    assert configure(["snapkv"], ["head_split=global", "head_floor=0.2"])[0].head_floor == 0.2
    assert "head_floor" in make_method("snapkv").params() and "head_floor" not in make_method("h2o").params()
    with pytest.raises(BudgetError, match="head_floor must be between 0 and 1"):
        make_method("snapkv", head_floor=1.5)


def test_profile_budgets_follow_the_retrieval_profile():
    """head_split=profile (HeadKV's budgets): the layers' shares x heads in all, each head its floor,
    the rest by the profile's weight of its best query head, none past its cap or its candidates."""
    from kvcli.methods.base import PROFILE_CAP, profile_budgets, profile_weights
    from kvcli.profile import RetrievalProfile

    # 3 layers of 2 KV heads, 2 query heads each: scores are -log2(rank + 1) of the fact
    profile = RetrievalProfile(scores=[[-9, -9, -9, -8], [0, -9, -9, -9], [-3, -9, -2, -9]], model="t")
    weights = profile_weights(profile, 3, 2)
    assert weights[1] == [1.0, 2.0 ** -9] and weights[0] == [2.0 ** -9, 2.0 ** -8]
    sizes = profile_budgets(weights, [10, 10, 10], 0.0, [1000] * 3)
    assert sum(map(sum, sizes)) == 60
    assert sizes[1][0] == PROFILE_CAP * 10  # the best head (rank 0) keeps up to its cap
    assert sizes[2][1] > sizes[2][0] > sizes[0][1] >= sizes[0][0]  # by weight: rank 3 over rank 7 over rank 255 and 511
    assert profile_budgets(weights, [10, 10, 10], 1.0, [1000] * 3) == [[10, 10]] * 3  # a floor of 1: the equal split
    floored = profile_budgets(weights, [10, 10, 10], 0.5, [1000] * 3)
    assert min(map(min, floored)) >= 5 and sum(map(sum, floored)) == 60
    assert max(map(max, profile_budgets(weights, [10, 10, 10], 0.0, [12] * 3))) == 12  # never past the candidates
    with pytest.raises(BudgetError, match="internal: the profile"):
        profile_weights(profile, 3, 3)


@pytest.mark.parametrize("held,known", [((100, 100, 22), True), ((22, 100, 100), False)])
def test_layers_holding_fewer_entries_keep_the_profile_budget(held, known):
    """Where layers hold different numbers of entries (a cut before a second repeat), the profile's sizes follow
    what each holds when that is known first (`Compressor.entries_held`); a layer that turns out to hold fewer than planned
    keeps them all and the layers after it keep the rest. The budget's entries are kept either way."""
    from kvcli.methods.base import BudgetPlan, Compressor
    from kvcli.profile import RetrievalProfile

    profile = RetrievalProfile(scores=[[0, -9], [-9, -9], [0, -9]], model="t")  # 3 layers, 1 query head per KV head
    method = make_method("snapkv", head_split="profile", window_size=2)
    compressor = Compressor(method, BudgetPlan(num_layers=3, prompt_len=100, total=36), profile)  # 12 a layer, 10 outside the window
    if known:
        compressor.entries_held = list(held)
    kept = []
    for layer, n in enumerate(held):
        positions = torch.arange(n).expand(2, -1)
        scores = torch.rand(2, n - 2, generator=torch.Generator().manual_seed(layer))
        kept.append([len(p) - 2 for p in compressor.select(layer, scores, positions)[layer]])
    small = held.index(22)
    assert kept[small][0] == 20 and sum(map(sum, kept)) == 3 * 2 * 10
    if known:
        assert kept[0][0] > 20  # the other best head, where its layer holds more, took what the small layer's could not


def test_profile_split_gives_the_profiles_heads_more_of_the_same_evidence(tiny, ids):
    """Under head_split=profile (shared_fraction 1) each head keeps its size of one evidence ranking:
    a smaller head's entries outside the window are among a larger head's of the same layer."""
    from kvcli.methods.base import profile_budgets, profile_weights

    squeezed = compression("evidencekv", "profile")
    cache = prefill(tiny, ids, squeezed).cache
    weights = profile_weights(squeezed.profile, NUM_LAYERS, NUM_KV_HEADS)
    sizes = profile_budgets(weights, [b - 8 for b in squeezed.method.layer_budgets(squeezed.plan)], 0.0, [PROMPT_LEN - 8] * NUM_LAYERS)
    assert cache.head_lengths() == [[n + 8 for n in layer] for layer in sizes]
    assert any(len(set(layer)) > 1 for layer in sizes)
    for layer in cache.layers:
        small, large = sorted(layer.head_positions(), key=len)
        assert set(small[:-8].tolist()) <= set(large[:-8].tolist())


def test_heads_summary_says_how_uneven_the_split_was():
    """The report's heads summary gives the fewest and most entries one global layer's head kept; None when every layer is even."""
    assert heads_summary([[4, 4], [6, 6]]) is None
    assert heads_summary([[2, 9], [6, 6], [30, 30]], [None, None, 31]) == {"min": 2, "max": 9, "per_layer": [[2, 9], [6, 6], [30, 30]]}


# --- on a tiny random grouped-query Llama -------------------------------------------------------

PROMPT_LEN, NUM_LAYERS = 80, 4


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(NUM_LAYERS)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def compression(name: str, split: str, ratio: float = 0.25, **params):
    method = make_method(name, head_split=split, **params)
    return squeeze(method, plan_budget(PROMPT_LEN, NUM_LAYERS, window_size=method.window_size, ratio=ratio))


@pytest.mark.parametrize("name,split,params", [
    ("snapkv", "adaptive", {}), ("snapkv", "global", {}), ("pyramidkv", "adaptive", {}), ("dynamickv", "adaptive", {"period": 2}),
    ("evidencekv", "adaptive", {"shared_fraction": 0.5}),  # all shared (the default): every head keeps the same evidence
    ("snapkv", "global", {"head_floor": 0.5}), ("dynamickv", "adaptive", {"period": 2, "head_floor": 0.5}),
    ("evidencekv", "adaptive", {"shared_fraction": 0.5, "head_floor": 0.5}),
    ("evidencekv", "profile", {}), ("evidencekv", "profile", {"head_floor": 0.5}), ("evidencekv", "profile", {"shared_fraction": 0.5}),
    ("snapkv", "profile", {}), ("snapkv", "profile", {"head_floor": 0.2}),
])
def test_live_split_equals_replayed_and_keeps_the_budget(tiny, ids, name, split, params):
    """A per-head split live keeps, per head, what Capture.derive keeps, decodes the same tokens, and holds the budget's entries exactly."""
    squeezed = compression(name, split, **params)
    live = prefill(tiny, ids, squeezed)
    derived = capture(tiny, ids, 8).derive(squeezed)
    assert any(layer.packed for layer in live.cache.layers), "the split should leave some heads unequal on random weights"
    for a, b in zip(live.cache.layers, derived.cache.layers):
        assert [p.tolist() for p in a.head_positions()] == [p.tolist() for p in b.head_positions()]
    kept = sum(sum(layer.head_lengths()) for layer in live.cache.layers)
    assert kept == squeezed.plan.total * NUM_KV_HEADS
    per_entry = live.cache.layers[0].entry_nbytes() // NUM_KV_HEADS
    assert live.cache.nbytes() == kept * per_entry
    assert list(decode(tiny, live, 8, set())) == list(decode(tiny, derived, 8, set()))


@pytest.mark.parametrize("name,split", [("snapkv", "adaptive"), ("snapkv", "profile"), ("evidencekv", "profile")])
def test_a_split_read_in_chunks_past_the_context_packs_each_head(tiny, ids, name, split):
    """Read in re-indexed chunks with a per-head split, layer 0's heads hold the keys the model computes at their packed positions."""
    squeezed = compression(name, split, ratio=0.3)
    state = prefill(tiny, ids, squeezed, chunk_size=32, reindex=Reindexer(rotary_layout(tiny.config)))
    layer = state.cache.layers[0]
    assert layer.packed
    fresh = new_cache(tiny)
    for h in range(NUM_KV_HEADS):
        keys, _, kept, placed = layer.head_entries(h)
        assert int(placed[-1]) == state.next_position - 1
        fresh = new_cache(tiny)
        with torch.inference_mode():
            forward(tiny, fresh, ids[:, kept], 0, positions=placed)
        torch.testing.assert_close(keys[0, 0], fresh.layers[0].view()[0][0, h], atol=1e-5, rtol=0)
    assert len(list(decode(tiny, state, 4, set()))) == 4


def test_the_repeat_scorer_splits_globally(tiny, ids):
    """Ranking a full cache by per-entry scores with the global split keeps total x heads entries over the layers, unevenly."""
    from kvcli.repeat import keep_by_scores

    state = prefill(tiny, ids)
    gen = torch.Generator().manual_seed(2)
    scores = [torch.rand(NUM_KV_HEADS, 2, PROMPT_LEN, generator=gen) * (i + 1) for i in range(NUM_LAYERS)]  # deeper layers score higher
    squeezed = compression("snapkv", "global")
    keep_by_scores(state.cache, scores, squeezed)
    lengths = state.cache.head_lengths()
    assert sum(map(sum, lengths)) == squeezed.plan.total * NUM_KV_HEADS
    assert sum(lengths[-1]) > sum(lengths[0])


def test_a_split_cache_survives_a_kvc_round_trip_and_decodes_alike(tiny, ids, tmp_path):
    """A packed cache saved and loaded decodes the same tokens as the cache it was saved from."""
    from kvcli.generate import Prefill

    state = prefill(tiny, ids, compression("snapkv", "adaptive"))
    path = tmp_path / "doc.kvc"
    save_cache(path, state.cache, META)
    loaded = Prefill(cache=load_cache(path, "abc", "m").cache, logits=state.logits, prompt_len=PROMPT_LEN, seconds=0.0)
    assert any(layer.packed for layer in loaded.cache.layers)
    assert list(decode(tiny, loaded, 8, set())) == list(decode(tiny, state, 8, set()))


def test_the_equal_split_leaves_every_layer_dense(tiny, ids):
    """The equal split (the default) leaves every layer in the dense layout, as before per-head budgets."""
    state = prefill(tiny, ids, compression("snapkv", "equal"))
    assert not any(layer.packed for layer in state.cache.layers)


@pytest.mark.parametrize("split", ["adaptive", "global", "profile"])
def test_read_once_splits_heads_as_one_pass(tiny, ids, split):
    """A question fed after a full prefix read once keeps, per head, what one pass over prefix + question keeps, the prefix untouched."""
    from kvcli.generate import ask_after, read_prefix

    squeezed = compression("snapkv", split)
    whole = prefill(tiny, ids, squeezed)
    prefix = read_prefix(tiny, ids[:, :-10], window_size=8)
    before = prefix.state.cache.nbytes()
    once = ask_after(tiny, prefix, ids[:, -10:], squeezed)
    for a, b in zip(once.cache.layers, whole.cache.layers):
        assert [p.tolist() for p in a.head_positions()] == [p.tolist() for p in b.head_positions()]
    assert prefix.state.cache.nbytes() == before and not any(layer.packed for layer in prefix.state.cache.layers)


def test_head_views_are_the_head_entries_keys_and_values():
    """`head_views` (what decode attends) is `head_entries` without the positions, packed or dense."""
    torch.manual_seed(0)
    packed, dense = KVLayer(), KVLayer()
    lengths = (3, 5)
    packed.load_heads([torch.randn(1, 1, n, 8) for n in lengths], [torch.randn(1, 1, n, 8) for n in lengths],
                      [torch.arange(n) for n in lengths])
    dense.load(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.arange(4).expand(2, -1))
    for layer in (packed, dense):
        views = layer.head_views()
        assert len(views) == 2
        for h, (keys, values) in enumerate(views):
            entries = layer.head_entries(h)
            assert torch.equal(keys, entries[0]) and torch.equal(values, entries[1])
    assert packed.packed and [k.shape[2] for k, _ in packed.head_views()] == [3, 5]
