"""Re-indexing kept keys so that a document longer than the model's positions can be read whole.

The document is read in chunks, compressing after each (as `--chunk-size` does). After each
chunk every layer's kept entries are packed, in their original order, right before one
common position P (P = the most entries any layer keeps): a layer keeping k entries holds them
at P - k .. P - 1, and the next chunk is fed at P, P + 1, ... Keys are stored post-RoPE, so
moving an entry from position p to p' is one rotation by p' - p with the layer's own rotary
frequencies (`kvcli/rope.py`); NoPE layers need none. Every position the model sees is then
below P + one chunk + the question, whatever the document's length; each entry keeps its
original position for the method's choices and for reports.

Each pack rotates a key from the key the model computed and the position it computed it at,
never from the last pack's result: the cache holds keys in the model's dtype, and rotating the
last pack's keys again rounds them once more per chunk (bfloat16: after 64 packs 14x as far from
the exact rotation as after one, 2.8e-2 against 2.0e-3 relative; tests/test_rope.py). So for the read the
Reindexer keeps a copy of each kept key as computed, one more keys-sized buffer of the kept
entries, freed with the Reindexer when the read ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import KvcliError
from .rope import LayerRotary, rerotate


@dataclass
class _Computed:
    """A layer's kept keys as the model computed them, and where: what every pack rotates from."""

    keys: torch.Tensor  # (1, num_kv_heads, n, head_dim) in the cache's dtype
    at: torch.Tensor  # (num_kv_heads, n) int64: the RoPE position each key was computed at
    positions: torch.Tensor  # (num_kv_heads, n) int64: the entries' original positions, sorted per head


class Reindexer:
    """Packs a cache's layers just before the next chunk, re-rotating the keys that move.

    A layer whose heads hold different numbers of entries (a per-head split) is packed head by
    head: each head's entries end right before P, as a dense layer's do."""

    def __init__(self, layout: list[LayerRotary | None]) -> None:
        self.layout = layout  # per layer, from rope.rotary_layout(config); None: a NoPE layer
        self.packs = 0
        self.top = 0  # where the last pack put the next chunk: entries placed from here on were fed since
        # (layer, None) for a dense layer, (layer, head) for each head of a packed one
        self.computed: dict[tuple[int, int | None], _Computed] = {}

    def pack(self, cache) -> int:
        """Move every layer's entries to the positions right before P; return P, where the next token goes."""
        top = max(layer.get_seq_length() for layer in cache.layers)
        for i, (layer, rotary) in enumerate(zip(cache.layers, self.layout, strict=True)):
            units = [(h, head) for h, head in enumerate(layer.heads)] if layer.packed else [(None, layer)]
            for h, unit in units:
                n = unit.length
                positions = unit.kept_positions()
                target = torch.arange(top - n, top, device=positions.device).expand(positions.shape[0], -1)  # (num_kv_heads, n)
                if rotary is not None:
                    computed = self._computed((i, h), unit)
                    if not torch.equal(unit.rope_positions(), target):
                        keys, _ = unit.view()
                        keys.copy_(rerotate(computed.keys, computed.at, target, rotary))
                unit.place(target)
            if layer.packed:
                self.computed.pop((i, None), None)  # its heads keep their own records now
        self.packs += 1
        self.top = top
        return top

    def _previous(self, key: tuple[int, int | None]) -> _Computed | None:
        """The last pack's record for `key`; a head of a layer packed dense last time reads its row of the layer's."""
        if key in self.computed:
            return self.computed[key]
        layer, h = key
        whole = self.computed.get((layer, None))
        if h is None or whole is None:
            return None
        return _Computed(whole.keys[:, h : h + 1], whole.at[h : h + 1], whole.positions[h : h + 1])

    def _computed(self, key: tuple[int, int | None], layer) -> _Computed:
        """A layer's (or a packed layer's head's) kept keys as computed: the entries fed since the last
        pack as they are now, the older ones from the last pack's record (found by original position:
        both are sorted per head)."""
        keys, _ = layer.view()
        at = layer.rope_positions()
        positions = layer.kept_positions()
        previous = self._previous(key)
        if previous is None:
            keys, at = keys.clone(), at.clone()  # the cache's own buffers are rotated in place
        else:
            old = at < self.top  # (num_kv_heads, n): entries placed by an earlier pack, not fed since
            found = torch.searchsorted(previous.positions.contiguous(), positions.contiguous()).clamp(max=previous.positions.shape[1] - 1)
            if not torch.equal(previous.positions.gather(1, found)[old], positions[old]):
                raise KvcliError("internal: a packed entry is missing from the keys the re-indexing rotates from")
            gather = found[None, :, :, None].expand(-1, -1, -1, keys.shape[3])  # (1, num_kv_heads, n, head_dim)
            keys = torch.where(old[None, :, :, None], previous.keys.gather(2, gather), keys)
            at = torch.where(old, previous.at.gather(1, found), at)
        self.computed[key] = _Computed(keys, at, positions.clone())
        return self.computed[key]
