"""Arithmetic of kvcli's per-layer variable-length KV cache, and the transformers API it builds on."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcli.cache import KVCache, KVLayer
from kvcli.errors import KvcliError
from kvcli.step import Step

NUM_KV_HEADS, HEAD_DIM = 2, 4


def states(q_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(1, NUM_KV_HEADS, q_len, HEAD_DIM)` whose entries encode (head, position)."""
    head = torch.arange(NUM_KV_HEADS)[:, None, None] * 1000.0
    position = torch.arange(offset, offset + q_len)[None, :, None].float()
    keys = (head + position).expand(NUM_KV_HEADS, q_len, HEAD_DIM)[None].clone()
    return keys, -keys


def filled_layer(length: int) -> KVLayer:
    layer = KVLayer()
    keys, values = states(length)
    layer.append(keys, values, torch.arange(length))
    return layer


def test_append_grows_geometrically_and_views_everything():
    """append doubles the capacity when full (at least 16) and the view holds every appended entry in order."""
    layer = KVLayer()
    capacities = []
    for step in range(40):
        keys, values = states(1, offset=step)
        layer.append(keys, values, torch.tensor([step]))
        capacities.append(layer.capacity)
    assert capacities[0] == 16
    assert sorted(set(capacities)) == [16, 32, 64]
    keys, values = layer.view()
    expected_keys, expected_values = states(40)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert torch.equal(layer.kept_positions(), torch.arange(40).expand(NUM_KV_HEADS, -1))
    assert layer.get_seq_length() == 40


def test_append_a_block_larger_than_double():
    """A block larger than twice the capacity gets exactly the room it needs."""
    layer = filled_layer(3)
    keys, values = states(100, offset=3)
    layer.append(keys, values, torch.arange(3, 103))
    assert layer.capacity == 103 and layer.length == 103
    assert torch.equal(layer.view()[0], states(103)[0])


def test_keep_gathers_rows_per_head():
    """keep keeps each head's own entries, with their positions, in exactly-sized storage."""
    layer = filled_layer(10)
    local = torch.tensor([[0, 3, 9], [1, 2, 8]])
    layer.keep(local)
    keys, values = layer.view()
    assert keys.shape == (1, NUM_KV_HEADS, 3, HEAD_DIM)
    assert layer.capacity == 3
    for head in range(NUM_KV_HEADS):
        assert keys[0, head, :, 0].tolist() == [head * 1000.0 + p for p in local[head].tolist()]
        assert torch.equal(values[0, head], -keys[0, head])
    assert torch.equal(layer.kept_positions(), local)


def test_keep_positions_by_original_position():
    """keep_positions selects by original position, also after an earlier prune, and appending continues after it."""
    layer = filled_layer(20)
    layer.keep_positions(torch.tensor([[0, 5, 10, 15, 19], [1, 2, 3, 18, 19]]))
    layer.keep_positions(torch.tensor([[5, 15, 19], [2, 18, 19]]))
    assert layer.kept_positions().tolist() == [[5, 15, 19], [2, 18, 19]]
    assert layer.view()[0][0, 1, :, 0].tolist() == [1002.0, 1018.0, 1019.0]
    keys, values = states(1, offset=20)
    layer.append(keys, values, torch.tensor([20]))
    assert layer.kept_positions().tolist() == [[5, 15, 19, 20], [2, 18, 19, 20]]
    assert layer.view()[0][0, 0, -1, 0].item() == 20.0


@pytest.mark.parametrize("missing", [[[0, 7], [1, 2]], [[0, 1], [1, 25]], [[0, 1], [-1, 2]]])
def test_keep_positions_refuses_positions_not_held(missing):
    """keep_positions raises when a head is asked to keep a position it does not hold."""
    layer = filled_layer(20)
    layer.keep_positions(torch.tensor([[0, 1, 5], [1, 2, 3]]))
    with pytest.raises(KvcliError):
        layer.keep_positions(torch.tensor(missing))


def test_nbytes_and_retained_per_layer():
    """nbytes counts the live keys and values of every layer; retained_per_layer their lengths; full_nbytes a full prompt's, from the tensors."""
    cache = KVCache(3)
    for layer_idx, length in enumerate([10, 4, 7]):
        keys, values = states(length)
        feed(cache, keys.half(), values.half(), layer_idx, length)
    cache.layers[0].keep(torch.arange(6).expand(NUM_KV_HEADS, -1))
    assert cache.retained_per_layer() == [6, 4, 7]
    assert cache.nbytes() == 2 * NUM_KV_HEADS * HEAD_DIM * 2 * (6 + 4 + 7)
    assert KVLayer().nbytes() == 0
    assert cache.full_nbytes(10) == 2 * NUM_KV_HEADS * HEAD_DIM * 2 * 30


def test_sliding_layer_keeps_its_window_and_counts_it_as_full():
    """A sliding-window layer keeps the last window - 1 entries before a dropped probe, in order; its full size is its window."""
    cache = KVCache(2, windows=[None, 6])
    for layer_idx in range(2):
        feed(cache, *states(20), layer_idx, 20)
    layer = cache.layers[1]
    layer.keep_recent(6, drop=3)  # entries 12..16 stay: 17..19 were the probe's
    assert torch.equal(layer.kept_positions(), torch.arange(12, 17).expand(NUM_KV_HEADS, -1))
    assert torch.equal(layer.view()[0], states(5, offset=12)[0])
    for position in range(17, 27):  # the next tokens (where the probe was): one in, one out, in place
        feed(cache, *states(1, offset=position), 1, 1, position)
        layer.keep_recent(6)
        assert torch.equal(layer.view()[0], states(5, offset=position - 4)[0])
    assert cache.retained_per_layer() == [20, 5] and cache.compressed_layers == [0] and cache.windows == [None, 6]
    entry = 2 * NUM_KV_HEADS * HEAD_DIM * 4
    assert cache.full_nbytes(100) == entry * (100 + 5) and cache.full_nbytes(3) == entry * 6
    assert cache.clone().windows == cache.fork().windows == [None, 6]


def test_update_outside_a_forward_pass_is_refused():
    """The cache takes positions from the step it holds while a pass runs; without one, or with two at once, it refuses."""
    cache = KVCache(1)
    with pytest.raises(KvcliError, match="outside"):
        cache.update(*states(1), 0)
    with cache.feeding(Step(cache=cache, positions=torch.arange(1))):
        with pytest.raises(KvcliError, match="one forward pass at a time"):
            with cache.feeding(Step(cache=cache, positions=torch.arange(1))):
                pass
    assert cache._step is None


def feed(cache, keys, values, layer_idx: int, length: int, start: int = 0):
    """`KVCache.update` as a forward pass calls it: with the cache holding a step of `length` positions from `start`."""
    with cache.feeding(Step(cache=cache, positions=torch.arange(start, start + length))):
        return cache.update(keys, values, layer_idx)


def test_update_returns_the_whole_layer_and_needs_positions():
    """KVCache.update appends at the step's positions and returns the layer's full keys and values."""
    cache = KVCache(1)
    keys, values = states(5)
    feed(cache, keys, values, 0, 5)
    out_keys, out_values = feed(cache, *states(1, offset=5), 0, 1, 5)
    assert torch.equal(out_keys, states(6)[0]) and torch.equal(out_values, states(6)[1])
    assert torch.equal(cache.layers[0].kept_positions(), torch.arange(6).expand(NUM_KV_HEADS, -1))
    assert cache.get_seq_length(0) == 6
    with pytest.raises(KvcliError):
        feed(cache, *states(2, offset=6), 0, 1, 6)  # one position for two tokens
    with pytest.raises(KvcliError):
        cache.update(*states(1, offset=6), 0)  # no step at all
    with pytest.raises(KvcliError):
        cache.layers[0].update(*states(1), 0)


def test_clone_keeps_the_peak():
    """A cloned cache keeps the KV peak of the one it copies (what --reuse and --cache report)."""
    cache = KVCache(1)
    feed(cache, *states(5), 0, 5)
    cache.peak_nbytes = 10 * cache.nbytes()
    copy = cache.clone()
    assert copy.kv_peak_nbytes == cache.kv_peak_nbytes == 10 * cache.nbytes()


def test_transformers_cache_api_still_fits():
    """transformers' Cache still takes `layers=` and KVLayer implements every abstract method of CacheLayerMixin.

    If this fails after a transformers upgrade, cache.py needs porting before the range in
    pyproject.toml is widened.
    """
    assert "layers" in inspect.signature(Cache.__init__).parameters
    cache = KVCache(4)
    assert len(cache) == 4 and all(isinstance(layer, KVLayer) for layer in cache.layers)
    assert not KVLayer.__abstractmethods__, f"unimplemented: {sorted(KVLayer.__abstractmethods__)}"
    for name in CacheLayerMixin.__abstractmethods__:
        assert getattr(KVLayer, name) is not getattr(CacheLayerMixin, name), f"KVLayer.{name} is the abstract stub"
    layer = KVLayer()
    # CacheLayerMixin.__init__ still sets the attributes KVLayer relies on.
    assert layer.keys is None and layer.values is None and layer.is_initialized is False
    keys, values = states(3)
    layer.append(keys, values, torch.arange(3))
    assert layer.get_mask_sizes(2) == (5, 0)
    assert layer.get_max_length() == -1
    assert cache.get_seq_length(0) == 0


def test_reserve_grows_exactly_and_keeps_entries():
    """KVCache.reserve makes exactly the room asked for, keeping every stored entry."""
    cache = KVCache(2)
    for layer in cache.layers:
        layer.append(torch.ones(1, 2, 20, 4), torch.ones(1, 2, 20, 4), torch.arange(20))
    cache.reserve(7)
    for layer in cache.layers:
        assert layer.capacity == 27 and layer.length == 20
        assert torch.equal(layer.view()[0], torch.ones(1, 2, 20, 4))
    cache.layers[0].append(torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4), torch.arange(20, 27))
    assert cache.layers[0].capacity == 27


def test_fork_copies_a_layer_only_when_written_and_never_changes_the_base():
    """A fork reads as its base until a step appends to a layer; then that layer is base + new entries, the base unchanged."""
    base = KVCache(2)
    for layer_idx in range(2):
        feed(base, *states(5), layer_idx, 5)
    before = [tuple(t.clone() for t in layer.view()) for layer in base.layers]
    fork = base.fork()
    assert fork.nbytes() == 0 and torch.equal(fork.layers[1].view()[0], base.layers[1].view()[0])
    keys, _ = feed(fork, *states(2, offset=5), 0, 2, 5)
    assert torch.equal(keys, states(7)[0])
    assert torch.equal(fork.layers[0].kept_positions(), torch.arange(7).expand(NUM_KV_HEADS, -1))
    fork.layers[0].keep(torch.tensor([[0, 6], [1, 6]]))
    for layer, (k, v) in zip(base.layers, before):
        assert torch.equal(layer.view()[0], k) and torch.equal(layer.view()[1], v) and layer.length == 5


def test_a_packed_sliding_layer_records_where_rope_places_every_later_entry():
    """Re-indexing a sliding layer that keeps its window in place (a buffer wider than its entries)
    records the packed RoPE positions in a buffer as wide as the others: the tokens appended and
    slid after it keep theirs too (a narrower record lost them and then failed to slide)."""
    from kvcli.reindex import Reindexer

    layer = filled_layer(20)
    layer.keep_recent(12)  # entries 9..19 kept in place in the 20-wide buffer
    assert layer.capacity > layer.length == 11
    cache = KVCache(1)
    cache.layers[0] = layer
    top = Reindexer([None]).pack(cache)  # a NoPE layer: keys stay, positions are packed
    assert top == 11 and torch.equal(layer.rope_positions(), torch.arange(0, 11).expand(NUM_KV_HEADS, -1))
    for step in range(12):  # the next tokens, placed at 11, 12, ... while their original positions go on from 20
        layer.append(*states(1, offset=20 + step), torch.tensor([20 + step]), rope_positions=torch.tensor([11 + step]))
        layer.keep_recent(12)
        assert torch.equal(layer.rope_positions(), torch.arange(1 + step, 12 + step).expand(NUM_KV_HEADS, -1))
        assert torch.equal(layer.kept_positions(), torch.arange(10 + step, 21 + step).expand(NUM_KV_HEADS, -1))
