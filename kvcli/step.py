"""The step context: what one forward pass asks of kvcli's cache and attention function.

`generate.forward` builds a `Step` for every forward pass and hands it to the model as the
keyword argument `kvcli_step`; transformers passes it on to `KVCache.update` (which appends
the new entries at `positions`) and to kvcli's attention function (which, after a layer's
attention, lets the running compressor prune that layer). Nothing is stored on the cache
for the duration of a step, so an exception mid-forward leaves no stale state behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

STEP_KWARG = "kvcli_step"


@dataclass
class Step:
    """One forward pass: where its tokens sit, and what happens after each layer's attention."""

    cache: object  # the kvcli.cache.KVCache being read into (attention functions are not given the cache)
    positions: torch.Tensor  # (q_len,) the position of every token fed in this step (what RoPE sees)
    # (q_len,) the tokens' places in the prompt, when re-indexing feeds them at other positions;
    # None: the same as `positions`
    original: torch.Tensor | None = None
    compressor: object | None = None  # a methods.Compressor (or capture recorder) pruning each layer
    probe_len: int = 0  # trailing tokens that score the rest but are not kept (the question after a chunk)
    on_layer: Callable[[int], None] | None = None  # called with layer_idx after each layer (progress)
    # Per layer, attention already received by the cached entries from queries of earlier steps
    # (a read-once prefix's own), added to this step's for methods that sum over all queries (H2O).
    accumulated_before: list[torch.Tensor] | None = None
    # Per layer, the last queries of the earlier steps (a read-once prefix's tail), so a step
    # shorter than the observation window is scored by a whole window, as in one pass.
    queries_before: list[torch.Tensor] | None = None

    def after_attention(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """Called by the attention function once layer `layer_idx` has attended over its keys."""
        cache = self.cache
        if self.compressor is not None:
            # The peak is now: this layer holds its full new KV, not yet compressed. Without a
            # compressor the cache only grows, so its final size is its peak.
            cache.peak_nbytes = max(cache.peak_nbytes, cache.nbytes())
            keys, _ = cache.layers[layer_idx].view()
            self.compressor.observe_live(
                cache, layer_idx, query, keys, scaling, probe_len=self.probe_len,
                accumulated_before=self.accumulated_before[layer_idx] if self.accumulated_before is not None else None,
                queries_before=self.queries_before[layer_idx] if self.queries_before is not None else None,
            )
        if self.on_layer is not None:
            self.on_layer(layer_idx)


def step_of(kwargs: dict) -> Step | None:
    """The `Step` among a model's forwarded keyword arguments, or None when kvcli is not driving."""
    step = kwargs.get(STEP_KWARG)
    if step is None and isinstance(kwargs.get("kwargs"), dict):  # KVCache.update receives them nested
        step = kwargs["kwargs"].get(STEP_KWARG)
    return step
