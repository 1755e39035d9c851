"""Re-indexing kept keys so that a document longer than the model's positions can be read whole.

The document is read in chunks, compressing after each (as `--chunk-size` does). After each
chunk every layer's kept entries are packed, in their original order, right before one
common position P (P = the most entries any layer keeps): a layer keeping k entries holds them
at P - k .. P - 1, and the next chunk is fed at P, P + 1, ... Keys are stored post-RoPE, so
moving an entry from position p to p' is one rotation by p' - p with the layer's own rotary
frequencies (`kvcli/rope.py`); NoPE layers need none. Every position the model sees is then
below P + one chunk + the question, whatever the document's length; each entry keeps its
original position for the method's choices and for reports.
"""

from __future__ import annotations

import torch

from .rope import LayerRotary, rerotate


class Reindexer:
    """Packs a cache's layers just before the next chunk, re-rotating the keys that move."""

    def __init__(self, layout: list[LayerRotary | None]) -> None:
        self.layout = layout  # per layer, from rope.rotary_layout(config); None: a NoPE layer
        self.packs = 0

    def pack(self, cache) -> int:
        """Move every layer's entries to the positions right before P; return P, where the next token goes."""
        top = max(layer.length for layer in cache.layers)
        for layer, rotary in zip(cache.layers, self.layout, strict=True):
            n = layer.length
            heads = layer.kept_positions().shape[0]
            target = torch.arange(top - n, top, device=layer.keys.device).expand(heads, -1)  # (num_kv_heads, n)
            current = layer.rope_positions()
            if rotary is not None and not torch.equal(current, target):
                keys, _ = layer.view()
                keys.copy_(rerotate(keys, current, target, rotary))
            layer.place(target)
        self.packs += 1
        return top
