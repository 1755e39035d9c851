"""The step context: what one forward pass asks of kvcli's cache and attention function.

`generate.forward` builds a `Step` for every forward pass. The cache holds it for the length
of the pass (`KVCache.feeding`, so architectures that call `Cache.update` without passing
keyword arguments on, such as GPT-NeoX, still append at the step's positions), and the model
hands it to kvcli's attention function as the keyword argument `kvcli_step`. After a layer's
attention, the function calls `Step.after_attention`: the running compressor prunes a global
layer there, and a sliding-window layer drops what no later token can see. The step is released
when the pass ends, however it ends, so an exception mid-forward leaves no stale state behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import KvcliError

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
    # Filled in as the pass goes: each layer whose attention went through kvcli's function, and
    # how it attends (attention.LayerAttention). A layer missing here attended on its own.
    attended: dict[int, object] = field(default_factory=dict)
    # A skim's filter (kvcli.skim.Filter): scores the prompt at its heads' layers and ends the pass
    # (raising `FilterDone`) after the deepest of them, so the later layers never run.
    skim: object | None = None
    # Something that looks at each layer's attention before anything is pruned (an
    # attribution.DecodeAttention for --sources); None: nothing looks, nothing is computed.
    watch: object | None = None

    def after_attention(self, layer_idx: int, query: torch.Tensor, attn) -> None:
        """Called by the attention function once layer `layer_idx` has attended over its keys;
        `attn` (attention.LayerAttention) is how it attended."""
        cache = self.cache
        self.attended[layer_idx] = attn
        if self.watch is not None:
            self.watch.observe(layer_idx, query, cache, attn)
        if self.skim is not None:  # before the compressor prunes the keys it scores
            self.skim.observe(cache, layer_idx, query, attn, self.probe_len)
        sliding = attn.sliding_window is not None
        if self.compressor is not None or sliding:
            # The peak is now: this layer holds its full new KV, not yet compressed. Without a
            # compressor or a sliding layer the cache only grows, so its final size is its peak.
            cache.peak_nbytes = max(cache.peak_nbytes, cache.nbytes())
        if self.compressor is not None and cache.layers[layer_idx].packed:
            raise KvcliError("internal: a layer whose heads hold different numbers of entries cannot be compressed again "
                             "(a read in chunks splits heads at its last step only)")
        if self.compressor is not None:
            # Every layer is shown; a compressor leaves sliding-window layers (attn.sliding_window) alone.
            keys, _ = cache.layers[layer_idx].view()
            self.compressor.observe_live(
                cache, layer_idx, query, keys, attn, probe_len=self.probe_len,
                accumulated_before=self.accumulated_before[layer_idx] if self.accumulated_before is not None else None,
                queries_before=self.queries_before[layer_idx] if self.queries_before is not None else None,
            )
        if sliding:
            # No later token can see further back than the window: keep its last window - 1
            # entries (the next token is the window's last), never the probe's.
            cache.layers[layer_idx].keep_recent(attn.sliding_window, drop=self.probe_len)
        if self.on_layer is not None:
            self.on_layer(layer_idx)
        if self.skim is not None and layer_idx >= self.skim.stop_layer:
            raise FilterDone(layer_idx)


class FilterDone(Exception):  # noqa: N818 (not an error: how a skim's filter pass ends early)
    """Raised after the last layer a skim's filter reads: the rest of the forward pass is skipped."""


def step_of(kwargs: dict) -> Step | None:
    """The `Step` among a model's forwarded keyword arguments, or None when kvcli is not driving."""
    return kwargs.get(STEP_KWARG)
