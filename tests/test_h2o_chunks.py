"""H2O across the steps of a chunked read: kept entries carry their accumulated attention (issue 22, defect 6)."""

from __future__ import annotations

import pytest
import torch

from kvcli.attention import LayerAttention, accumulated_attention
from kvcli.cache import KVCache
from kvcli.generate import prefill
from kvcli.methods import BudgetPlan, Compression, make_method
from methodutil import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_DIM = 32
PLAIN = LayerAttention(scaling=1.0)


def pointing(targets: list[int | None], strength: float = 8.0) -> torch.Tensor:
    """Queries `(1, 1, n, HEAD_DIM)`: row i points at the key of token targets[i] (None: attends evenly)."""
    query = torch.zeros(1, 1, len(targets), HEAD_DIM)
    for row, target in enumerate(targets):
        if target is not None:
            query[0, 0, row, target] = strength
    return query


def one_hot_keys(positions: range) -> torch.Tensor:
    """Keys `(1, 1, n, HEAD_DIM)`: token j's key is the unit vector j, so a query picks its tokens exactly."""
    return torch.eye(HEAD_DIM)[list(positions)][None, None]


# Token 3 is heavy in chunk 1 (queries 3-9 point at it) and receives nothing in chunk 2, where
# queries point at tokens 12 (12-14, 18-19) and 15 (15-17).
CHUNK_1 = [None, None, None] + [3] * 7
CHUNK_2 = [None, None, 12, 12, 12, 15, 15, 15, 12, 12]


def read_in_chunks(total: int, carry: bool = True) -> tuple[KVCache, object]:
    """Two chunks of ten tokens through H2O (window 2) on one layer with one head; the cache and last compressor."""
    method = make_method("h2o", window_size=2)
    compression = Compression(method, BudgetPlan(num_layers=1, prompt_len=20, total=total))
    cache = KVCache(1)
    layer = cache.layers[0]
    compressor = None
    for queries, positions in ((CHUNK_1, range(0, 10)), (CHUNK_2, range(10, 20))):
        keys = one_hot_keys(positions)
        layer.append(keys, keys.clone(), torch.tensor(list(positions)))
        compressor = compression.compressor() if compressor is None or not carry else compressor.next_step()
        compressor.observe_live(cache, 0, pointing(queries), layer.view()[0], PLAIN)
    return cache, compressor


def test_h2o_keeps_a_token_heavy_in_an_earlier_chunk():
    """A token heavy in chunk 1 and unattended in chunk 2 outranks chunk 2's second token by accumulated attention, so h2o keeps it."""
    cache, _ = read_in_chunks(total=4)  # two heavy hitters and the window
    assert cache.layers[0].kept_positions()[0].tolist() == [3, 12, 18, 19]
    # Chunk 2's queries alone rank token 15 above token 3: what a step that forgets chunk 1 keeps.
    forgetful, _ = read_in_chunks(total=4, carry=False)
    assert forgetful.layers[0].kept_positions()[0].tolist() == [12, 15, 18, 19]


def test_h2o_chunked_scores_equal_one_pass_without_eviction():
    """While nothing is evicted before the last chunk, chunked h2o carries exactly one pass's accumulated attention and keeps its tokens."""
    cache, compressor = read_in_chunks(total=12)  # room for all of chunk 1: nothing is evicted before chunk 2
    whole = one_hot_keys(range(20))
    one_pass = accumulated_attention(pointing(CHUNK_1 + CHUNK_2), whole, PLAIN)[0, 0]  # (20,)
    kept = cache.layers[0].kept_positions()[0]
    assert torch.allclose(compressor.kept_scores[0][0, 0], one_pass[kept], atol=1e-5)
    top = one_pass[:18].topk(10).indices.sort().values
    assert kept.tolist() == top.tolist() + [18, 19]


def test_h2o_probe_is_not_carried():
    """The question fed after a chunk scores that chunk's choice, but the kept entries carry only the prompt's queries' attention."""
    method = make_method("h2o", window_size=2)
    compression = Compression(method, BudgetPlan(num_layers=1, prompt_len=20, total=12))
    cache = KVCache(1)
    layer = cache.layers[0]
    probe = [5, 5]  # two question tokens pointing at token 5
    keys = torch.cat([one_hot_keys(range(10)), one_hot_keys(range(20, 22))], dim=2)
    layer.append(keys, keys.clone(), torch.tensor(list(range(10)) + [20, 21]))
    compressor = compression.compressor()
    compressor.observe_live(cache, 0, pointing(CHUNK_1 + probe), layer.view()[0], PLAIN, probe_len=2)
    alone = accumulated_attention(pointing(CHUNK_1), one_hot_keys(range(10)), PLAIN)[0, 0]
    kept = layer.kept_positions()[0]
    assert kept.tolist() == list(range(10))
    assert torch.allclose(compressor.kept_scores[0][0, 0], alone, atol=1e-5)


def test_h2o_chunked_read_equals_one_pass_on_a_model():
    """On a tiny model, a chunked h2o read whose budget holds its first chunk keeps exactly the positions of a one-pass read."""
    model = tiny_llama(2)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    method = make_method("h2o")
    compression = Compression(method, BudgetPlan(num_layers=2, prompt_len=48, total=2 * 30))
    one = prefill(model, ids, compression)
    chunked = prefill(model, ids, compression, chunk_size=24)
    assert len(chunked.chunks) == 2
    for a, b in zip(one.cache.layers, chunked.cache.layers, strict=True):
        assert torch.equal(a.kept_positions(), b.kept_positions())
