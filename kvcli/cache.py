"""The KV cache kvcli decodes from: per-layer variable lengths, one entry per KV head.

Each layer keeps, for every KV head, the keys and values of the tokens it retained and
the original position of each. Layers may hold different numbers of tokens. Within a layer the
KV heads usually hold the same number (each head its own tokens), stored as one dense
`(1, num_kv_heads, n, head_dim)` block; a method that splits a layer's budget unevenly over its
heads (`head_split`, kvcli/methods/base.py) leaves the layer *packed*: one single-head layer per
KV head, each exactly as long as what that head kept, so the bytes held are the sum of the head
lengths with no padding to the longest. Decode appends one entry to every head either way: a
packed layer keeps its heads one after another in one buffer each for keys, values and positions,
every head with room to grow (`_Pool`), so a step writes all its heads' new entries with one copy
per buffer, as a dense layer does; `attention.attend_packed` attends a CPU decode step over the
pool in one call of kvcli's kernel (`pooled_rows`, kvcli/decode_kernel.py), and anything else one
KV head (with its query heads) at a time (`attention.attend_heads`). Keys are stored post-RoPE,
so kept tokens need no re-rotation and new tokens continue from the full prompt's positions;
only a document read past the model's positions is re-indexed, and then each entry also
records where RoPE now places it (`rope`). A sliding-window layer (`window`) is never
compressed: after each step it keeps its latest `window - 1` tokens, all the next token can see.

Storage grows geometrically, so a decode step writes one row instead of concatenating the
whole layer. This module and `attention.py` are the only places that touch transformers'
cache internals; the pinned transformers range in pyproject.toml is what they were tested on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import KvcliError


@dataclass(eq=False)
class _Pool:
    """A packed layer's storage: its KV heads one after another in one buffer each, head h's region
    starting at `starts[h]`, so one decode step writes every head's new entry with one
    `index_copy_` per buffer. Each head's `KVLayer` holds views of its own region (`views[h]`); a
    head whose buffers were replaced since (a per-head keep, a re-indexed `place`) no longer holds
    them, and the layer then pools its heads again before the next append."""

    keys: torch.Tensor  # (1, 1, total, head_dim)
    values: torch.Tensor  # (1, 1, total, v_dim)
    positions: torch.Tensor  # (1, total) int64
    rope: torch.Tensor | None  # (1, total) int64, where RoPE placed each entry; None: not re-indexed
    starts: list[int]
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    lengths: list[int]  # each head's length when the pool last wrote it

    def __post_init__(self) -> None:
        # the buffers as rows, made once: a decode step writes through these (making a view costs
        # as much as the copy): keys/values `(total, 1, dim)`, the shape of one step's `(heads, 1, dim)`
        self.rows_keys, self.rows_values = self.keys[0, 0].unsqueeze(1), self.values[0, 0].unsqueeze(1)
        self.rows_positions = self.positions[0]
        self.rows_rope = None if self.rope is None else self.rope[0]
        # where each head's next entry goes
        self.tails = torch.tensor([start + n for start, n in zip(self.starts, self.lengths, strict=True)], device=self.keys.device)

    def holds(self, heads: list[KVLayer], more: int, rope: bool) -> bool:
        """Whether every head still reads this pool's region, as long as the pool last left it
        (so `tails` is where its next entry goes), with room for `more` entries."""
        if rope and self.rope is None:
            return False
        for head, (keys, values, positions, head_rope) in zip(heads, self.views, strict=True):
            if head.keys is not keys or head.values is not values or head.positions is not positions or head.rope is not head_rope:
                return False
            if head.base is not None or head.length + more > keys.shape[2]:
                return False
        return [head.length for head in heads] == self.lengths


def _rows(states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """New keys or values `(1, num_kv_heads, q_len, dim)` as rows `(num_kv_heads * q_len, 1, dim)`, head-major."""
    rows = states[0] if states.shape[2] == 1 else states[0].reshape(-1, 1, states.shape[-1])
    return rows if rows.dtype == dtype else rows.to(dtype)


def _per_head(positions: torch.Tensor, num_heads: int, device) -> torch.Tensor:
    """Positions `(q_len,)` once per KV head, head-major: `(num_heads * q_len,)`."""
    positions = positions.to(device)
    return positions.expand(num_heads) if positions.shape[0] == 1 else positions.repeat(num_heads)


class KVLayer(CacheLayerMixin):
    """One layer's cache: keys/values `(1, num_kv_heads, capacity, head_dim)` plus positions."""

    # transformers sizes its masks from this; kvcli builds each layer's mask itself, window included
    is_sliding = False
    is_compileable = False

    def __init__(self, base: KVLayer | None = None, window: int | None = None) -> None:
        super().__init__()
        self.length = 0
        # A sliding-window layer's window: it keeps its last window - 1 entries; None: a global layer.
        self.window = window if base is None else base.window
        self.positions: torch.Tensor | None = None  # (num_kv_heads, capacity) int64
        # Where each entry's RoPE places it, when that is not its original position (a document
        # read past the model's positions is re-indexed: kvcli/reindex.py); None: the same.
        self.rope: torch.Tensor | None = None  # (num_kv_heads, capacity) int64
        self.base = base if base is not None and base.is_initialized else None  # see KVCache.fork
        # A packed layer (heads of unequal lengths): one single-KV-head layer per KV head, and
        # keys/values/positions of its own unused. None: the dense layout.
        self.heads: list[KVLayer] | None = None
        self._pool: _Pool | None = None  # a packed layer's heads in one buffer each, once it appends
        if self.base is not None and self.base.heads is not None:
            # a fork of a packed layer forks each head: each copies itself on its first append
            self.heads = [KVLayer(base=head) for head in self.base.heads]
            self.base = None
            self.is_initialized = True
            self.length = max(head.get_seq_length() for head in self.heads)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, num_kv_heads, _, head_dim = key_states.shape
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states.new_empty((1, num_kv_heads, 0, head_dim))
        self.values = value_states.new_empty((1, num_kv_heads, 0, value_states.shape[-1]))
        self.positions = torch.empty((num_kv_heads, 0), dtype=torch.long, device=self.device)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _reserve(self, needed: int, exact: bool = False) -> None:
        """Grow the buffers to hold `needed` entries, doubling (unless `exact`) so appends are O(1)."""
        if needed <= self.capacity:
            return
        new_capacity = needed if exact else max(needed, 2 * self.capacity, 16)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], new_capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        for name in ("positions", "rope"):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_empty((old.shape[0], new_capacity))
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def reserve_more(self, extra: int) -> None:
        """Make room for `extra` more entries in every head, exactly."""
        if self.heads is not None:
            if self._pool is None or not self._pool.holds(self.heads, extra, self.reindexed):
                self._pool_heads(rooms=[extra] * len(self.heads))
        elif self.is_initialized and self.base is None:
            self._reserve(self.length + extra, exact=True)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor,
               rope_positions: torch.Tensor | None = None) -> None:
        """Append `q_len` new entries at original `positions` `(q_len,)` for every KV head, placed by
        RoPE at `rope_positions` `(q_len,)` when those differ (a re-indexed read)."""
        if self.base is not None:
            # A fork's first step: this layer's copy is the base's entries and the new ones,
            # made now (one layer at a time) so the base is never written to.
            base = self.base
            keys, values = base.view()
            heads = base.kept_positions().shape[0]
            grow = lambda old, new: torch.cat([old, new.to(old.device).expand(heads, -1)], dim=1)  # noqa: E731
            rope = None
            if base.rope is not None or rope_positions is not None:
                rope = grow(base.rope_positions(), positions if rope_positions is None else rope_positions)
            self.base = None
            self.load(torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2),
                      grow(base.kept_positions(), positions), rope)
            return
        if self.heads is not None:
            self._append_packed(key_states, value_states, positions, rope_positions)
            return
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if rope_positions is not None and self.rope is None:
            self.rope = self.positions.clone()  # until now RoPE placed every entry at its own position
        q_len = key_states.shape[2]
        end = self.length + q_len
        self._reserve(end)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.positions[:, self.length : end] = positions.to(self.positions.device)
        if self.rope is not None:
            self.rope[:, self.length : end] = (positions if rope_positions is None else rope_positions).to(self.rope.device)
        self.length = end

    def _append_packed(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor,
                       rope_positions: torch.Tensor | None) -> None:
        """`append` to a packed layer: every head's `q_len` new entries land at the end of its
        region of the pool, with one copy per buffer (the heads pooled again when one is full)."""
        heads = self.heads
        num_heads, q_len = key_states.shape[1], key_states.shape[2]
        pool = self._pool
        # a pool its heads still read records RoPE positions exactly when they were re-indexed
        if pool is None or not pool.holds(heads, q_len, rope_positions is not None):
            # room to grow geometrically, as a dense layer's `_reserve`: each head its own length again
            self._pool_heads(rooms=[max(q_len, 16, head.get_seq_length()) for head in heads],
                             rope=rope_positions is not None or self.reindexed)
            pool = self._pool
        index = pool.tails
        if q_len > 1:
            index = (index[:, None] + torch.arange(q_len, device=index.device)).reshape(-1)  # head-major, as the rows below
        pool.rows_keys.index_copy_(0, index, _rows(key_states, pool.keys.dtype))
        pool.rows_values.index_copy_(0, index, _rows(value_states, pool.values.dtype))
        pool.rows_positions.index_copy_(0, index, _per_head(positions, num_heads, index.device))
        if pool.rows_rope is not None:
            placed = positions if rope_positions is None else rope_positions
            pool.rows_rope.index_copy_(0, index, _per_head(placed, num_heads, index.device))
        pool.tails.add_(q_len)
        for head in heads:
            head.length += q_len
        pool.lengths = [length + q_len for length in pool.lengths]
        self.length += q_len

    def _pool_heads(self, rooms: list[int], rope: bool | None = None) -> None:
        """Copy the packed heads' entries into one new buffer each (keys, values, positions and, when
        re-indexed or `rope`, RoPE positions), head h with room for `rooms[h]` more; each head then
        holds views of its region. A fork's heads are copied from their base here, never written to."""
        heads = self.heads
        rope = self.reindexed if rope is None else rope
        lengths = [head.get_seq_length() for head in heads]
        starts, stops, total = [], [], 0
        for n, room in zip(lengths, rooms, strict=True):
            starts.append(total)
            total += n + room
            stops.append(total)
        first_keys, first_values = heads[0].view()
        keys = first_keys.new_empty((1, 1, total, first_keys.shape[3]))
        values = first_values.new_empty((1, 1, total, first_values.shape[3]))
        positions = torch.empty((1, total), dtype=torch.long, device=keys.device)
        rope_buffer = torch.empty((1, total), dtype=torch.long, device=keys.device) if rope else None
        views = []
        for head, start, stop, n in zip(heads, starts, stops, lengths, strict=True):
            head_keys, head_values = head.view()
            keys[:, :, start : start + n] = head_keys
            values[:, :, start : start + n] = head_values
            positions[:, start : start + n] = head.kept_positions()
            if rope_buffer is not None:
                rope_buffer[:, start : start + n] = head.rope_positions()
            view = (keys[:, :, start:stop], values[:, :, start:stop], positions[:, start:stop],
                    None if rope_buffer is None else rope_buffer[:, start:stop])
            head.keys, head.values, head.positions, head.rope = view
            head.base, head.length, head.is_initialized = None, n, True
            head.device, head.dtype = keys.device, keys.dtype
            views.append(view)
        self._pool = _Pool(keys, values, positions, rope_buffer, starts, views, lengths)
        self.length = max(lengths)

    def load(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor | None = None) -> None:
        """Take `keys`/`values` `(1, num_kv_heads, n, head_dim)`, `positions` `(num_kv_heads, n)` and
        (when re-indexed) where RoPE places each entry, `rope` `(num_kv_heads, n)`, as the layer."""
        self.device, self.dtype = keys.device, keys.dtype
        self.heads = None
        self._pool = None
        self.keys, self.values, self.positions = keys, values, positions.to(keys.device)
        self.rope = None if rope is None else rope.to(keys.device)
        self.length = positions.shape[1]
        self.is_initialized = True

    def load_heads(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: list[torch.Tensor],
                   rope: list[torch.Tensor] | None = None) -> None:
        """Take per-head entries as the layer: for KV head h, `keys[h]`/`values[h]` `(1, 1, n_h, head_dim)`,
        `positions[h]` (and, when re-indexed, `rope[h]`) `(n_h,)`. Equal lengths give the dense layout."""
        if len({p.shape[-1] for p in positions}) == 1:
            self.load(torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.stack([p.reshape(-1) for p in positions]),
                      None if rope is None else torch.stack([r.reshape(-1) for r in rope]))
            return
        self.heads = []
        self._pool = None
        for h in range(len(positions)):
            head = KVLayer()
            head.load(keys[h], values[h], positions[h].reshape(1, -1), None if rope is None else rope[h].reshape(1, -1))
            self.heads.append(head)
        self.device, self.dtype = keys[0].device, keys[0].dtype
        self.keys = self.values = self.positions = self.rope = None
        self.length = max(p.shape[-1] for p in positions)
        self.is_initialized = True

    @property
    def packed(self) -> bool:
        """Whether the KV heads hold different numbers of entries (one storage per head)."""
        return self.heads is not None

    @property
    def num_kv_heads(self) -> int:
        if self.heads is not None:
            return len(self.heads)
        return self.kept_positions().shape[0]

    def head_lengths(self) -> list[int]:
        """Entries held per KV head (all equal unless packed)."""
        if self.heads is not None:
            return [head.get_seq_length() for head in self.heads]
        if not self.is_initialized and self.base is None:
            return []
        return [self.get_seq_length()] * self.num_kv_heads

    def mean_length(self) -> float:
        """Entries held per KV head, the mean over heads: what a budget counts."""
        lengths = self.head_lengths()
        return sum(lengths) / len(lengths) if lengths else 0.0

    def pooled_rows(self) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]] | None:
        """A packed layer's pool as one read sees it: keys and values `(1, 1, total, head_dim)` and
        each KV head's first row and length in them; None unless every head reads the pool as it
        last wrote it (a layer pools its heads when it appends: a decode step's attention finds it so)."""
        pool = self._pool
        if pool is None or not pool.holds(self.heads, 0, False):
            return None
        return pool.keys, pool.values, pool.starts, pool.lengths

    def head_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each KV head's keys and values `(1, 1, n_h, head_dim)`, without their positions (what a
        decode step's attention reads, every layer, every step)."""
        if self.heads is not None:
            return [head.view() for head in self.heads]
        keys, values = self.view()
        return [(keys[:, h : h + 1], values[:, h : h + 1]) for h in range(keys.shape[1])]

    def head_entries(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """KV head h's keys and values `(1, 1, n_h, head_dim)`, original positions and RoPE positions `(n_h,)`."""
        if self.heads is not None:
            head = self.heads[h]
            keys, values = head.view()
            return keys, values, head.kept_positions()[0], head.rope_positions()[0]
        keys, values = self.view()
        return keys[:, h : h + 1], values[:, h : h + 1], self.kept_positions()[h], self.rope_positions()[h]

    def head_positions(self) -> list[torch.Tensor]:
        """Original positions of each KV head's entries, `(n_h,)` per head."""
        if self.heads is not None:
            return [head.kept_positions()[0] for head in self.heads]
        return list(self.kept_positions().unbind(0))

    @property
    def reindexed(self) -> bool:
        """Whether RoPE places some entry elsewhere than its original position (`rope` is recorded)."""
        if self.heads is not None:
            return any(head.reindexed for head in self.heads)
        return (self.base.rope if self.base is not None else self.rope) is not None

    def _dense_only(self, what: str) -> None:
        if self.heads is not None:
            raise KvcliError(f"internal: {what} of a layer whose heads hold different numbers of entries; read it per head (head_entries)")

    def rope_positions(self) -> torch.Tensor:
        """Where RoPE placed each stored entry, `(num_kv_heads, length)`: its original position unless re-indexed."""
        self._dense_only("rope_positions")
        if self.base is not None:
            return self.base.rope_positions()
        if self.rope is None:
            return self.kept_positions()
        return self.rope[:, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise KvcliError("internal: KVLayer.update needs positions; go through KVCache.update")

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live keys and values, `(1, num_kv_heads, length, head_dim)` each (a dense layer's)."""
        self._dense_only("view")
        if self.base is not None:
            return self.base.view()
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def kept_positions(self) -> torch.Tensor:
        """Original positions of the stored entries, `(num_kv_heads, length)` (a dense layer's)."""
        self._dense_only("kept_positions")
        if self.base is not None:
            return self.base.kept_positions()
        return self.positions[:, : self.length]

    def kept_per_group(self, group_of: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Kept entries per group, mean over KV heads: `group_of` `(n,)` names the group of each
        position below n (a prompt's tokens); entries at n or later (generated tokens) are not counted."""
        heads = self.head_positions()
        positions = torch.cat(heads).cpu() if heads else torch.empty(0, dtype=torch.long)  # every head's, one after another
        counted = positions[positions < group_of.shape[0]]
        counts = torch.bincount(group_of[counted], minlength=num_groups).float()
        return counts / max(1, len(heads))

    def keep(self, local_index: torch.Tensor) -> None:
        """Keep only the entries at `local_index` `(num_kv_heads, n_kept)` (sorted per head).

        The pruned layer is copied into exactly-sized storage so the full-length buffer is
        freed at once: this is what keeps the prefill's peak near the compressed size.
        """
        self._dense_only("keep")
        local_index = local_index.to(self.device)
        keys, values = self.view()
        gather = local_index[None, :, :, None]  # (1, num_kv_heads, n_kept, 1)
        self.keys = keys.gather(2, gather.expand(-1, -1, -1, keys.shape[3]))
        self.values = values.gather(2, gather.expand(-1, -1, -1, values.shape[3]))
        if self.rope is not None:
            self.rope = self.rope_positions().gather(1, local_index)
        self.positions = self.kept_positions().gather(1, local_index)
        self.length = local_index.shape[1]

    def place(self, rope_positions: torch.Tensor) -> None:
        """Record where RoPE now places each entry, `rope_positions` `(num_kv_heads, length)` (a
        re-indexed read), in a buffer as wide as the others so later appends land in it."""
        self._dense_only("place")
        if self.rope is None or self.rope.shape[1] != self.positions.shape[1]:
            self.rope = self.positions.new_empty(self.positions.shape)
        self.rope[:, : self.length] = rope_positions.to(self.rope.device)

    def keep_recent(self, window: int, drop: int = 0) -> None:
        """A sliding-window layer after a step: keep the last `window - 1` entries before the last
        `drop` (a probe's), in place so a decode step allocates nothing; a long prompt's buffer
        is copied into exactly-sized storage instead, so its memory is freed at once."""
        self.window = window
        stop = self.length - drop
        start = max(0, stop - (window - 1))
        if start == 0:
            self.length = stop
            return
        if self.capacity > 2 * window:
            heads = self.kept_positions().shape[0]
            self.keep(torch.arange(start, stop, device=self.device).expand(heads, -1))
            return
        n = stop - start
        for name in ("keys", "values"):
            buffer = getattr(self, name)
            buffer[:, :, :n] = buffer[:, :, start:stop].clone()
        for name in ("positions", "rope"):
            buffer = getattr(self, name)
            if buffer is not None:
                buffer[:, :n] = buffer[:, start:stop].clone()
        self.length = n

    def keep_positions(self, positions: torch.Tensor | list[torch.Tensor]) -> None:
        """Keep the entries whose original positions are `positions` `(num_kv_heads, n_kept)`, or
        per KV head `(n_h,)` each (a list): heads of unequal lengths leave the layer packed.

        Every requested position must be stored in that head; positions are kept sorted, so
        this is a search per head, not a scan.
        """
        if isinstance(positions, (list, tuple)):
            if len({p.shape[0] for p in positions}) == 1 and self.heads is None:
                positions = torch.stack(list(positions))
            else:
                self._keep_per_head(list(positions))
                return
        if self.heads is not None:
            self._keep_per_head(list(positions.unbind(0)))
            return
        stored = self.kept_positions().contiguous()
        positions = positions.to(stored.device)
        local_index = torch.searchsorted(stored, positions)
        found = stored.gather(1, local_index.clamp(max=stored.shape[1] - 1))
        if not torch.equal(found, positions):
            raise KvcliError("internal: a method asked to keep a token that the layer no longer holds")
        self.keep(local_index)

    def _keep_per_head(self, positions: list[torch.Tensor]) -> None:
        """keep_positions with `(n_h,)` positions per KV head: each head's entries are copied into
        a storage of its own, exactly sized, and the layer's full-length buffers are freed."""
        if len(positions) != self.num_kv_heads:
            raise KvcliError("internal: one list of kept positions per KV head")
        reindexed = self.reindexed
        heads = []
        for h, wanted in enumerate(positions):
            keys, values, stored, rope = self.head_entries(h)
            head = KVLayer()
            head.load(keys, values, stored[None], rope[None] if reindexed else None)
            head.keep_positions(wanted.reshape(1, -1))
            heads.append(head)
        self.base = None
        # packed, or the dense layout again where the heads came out equal after all
        self.load_heads([head.keys for head in heads], [head.values for head in heads], [head.positions[0] for head in heads],
                        [head.rope_positions()[0] for head in heads] if reindexed else None)

    def get_seq_length(self) -> int:
        if self.heads is not None:
            return max(head.get_seq_length() for head in self.heads)
        return self.base.length if self.base is not None else self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # a fork's layer is asked before its first step copies the base in: count the base's entries
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held by the live entries (keys and values); a fork's untouched layer holds none of its own."""
        if self.heads is not None:
            return sum(head.nbytes() for head in self.heads)
        if not self.is_initialized or self.base is not None:
            return 0
        return self.length * self.entry_nbytes()

    def entry_nbytes(self) -> int:
        """Bytes of one token's keys and values over the layer's KV heads, read from the stored tensors."""
        if self.heads is not None:
            return sum(head.entry_nbytes() for head in self.heads)
        if self.base is not None:
            return self.base.entry_nbytes()
        if not self.is_initialized:
            return 0
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in (self.keys, self.values))

    def full_length(self, prompt_len: int) -> int:
        """Entries this layer holds after reading `prompt_len` tokens with the full cache."""
        return prompt_len if self.window is None else min(prompt_len, self.window - 1)


class KVCache(Cache):
    """A transformers `Cache` whose layers hold different numbers of tokens.

    Each forward pass carries a `Step` (`kvcli/step.py`), which the cache holds while the pass
    runs (`feeding`): `update` appends the new entries at the step's positions, and the
    attention function hands each layer to the step right after that layer's attention.
    `windows` names each sliding-window layer's window (None: a global layer); a method
    compresses the global layers only (`compressed_layers`).
    """

    def __init__(self, num_layers: int, windows: list[int | None] | None = None) -> None:
        windows = windows if windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise KvcliError("internal: one window (or None) per layer")
        super().__init__(layers=[KVLayer(window=window) for window in windows])
        self.peak_nbytes = 0  # most KV bytes held at once while a compressor ran (after a layer's attention)
        self._step = None  # the Step of the forward pass running now (`feeding`)

    @contextlib.contextmanager
    def feeding(self, step):
        """Hold `step` while one forward pass writes to this cache. Some architectures call
        `update(keys, values, layer_idx)` without passing kvcli's step on (GPT-NeoX, Falcon,
        StableLM), so the cache takes the positions from the step it holds, not from keywords."""
        if self._step is not None:
            raise KvcliError("internal: a cache is fed by one forward pass at a time")
        self._step = step
        try:
            yield step
        finally:
            self._step = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise KvcliError("internal: kvcli's cache holds one sequence (batch size 1)")
        step = self._step
        if step is None:
            raise KvcliError("internal: kvcli's cache was written to outside a kvcli forward pass")
        if step.positions.shape[0] != key_states.shape[2]:
            raise KvcliError("internal: the step's positions do not match the tokens fed")
        layer = self.layers[layer_idx]
        if step.original is None:
            layer.append(key_states, value_states, step.positions)
        else:
            layer.append(key_states, value_states, step.original, rope_positions=step.positions)
        if layer.packed:
            # kvcli's attention function reads a packed layer per head from the step's cache
            # (attention.attend_heads); the model is handed empty keys and values, never a padded copy
            return key_states[:, :, :0], value_states[:, :, :0]
        return layer.view()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more entries per layer, exactly: decoding a known number of
        tokens then never doubles a layer's storage (which a CUDA allocator would keep)."""
        for layer in self.layers:
            # a sliding-window layer drops an entry for each it takes: one row of room is all it needs
            layer.reserve_more(extra if layer.window is None else min(extra, 1))

    def fork(self) -> KVCache:
        """A cache that reads as this one and copies each layer only when a step first writes to it.

        Read once, compress per question: the question is fed into a fork of the full document
        prefix; each layer is copied (prefix + question) right before its attention and
        compressed right after, so the prefix is never changed and only one layer is ever
        held in full twice.
        """
        fork = KVCache(self.num_layers, self.windows)
        fork.layers = [KVLayer(base=layer) for layer in self.layers]
        return fork

    def clone(self) -> KVCache:
        """An independent copy: several questions can each extend the same compressed prefix."""
        copy = KVCache(self.num_layers, self.windows)
        copy.peak_nbytes = self.peak_nbytes  # what making the copied cache cost is part of its story
        for source, target in zip(self.layers, copy.layers):
            if source.packed:
                entries = [source.head_entries(h) for h in range(source.num_kv_heads)]
                rope = [e[3].clone() for e in entries] if source.reindexed else None
                target.load_heads([e[0].clone() for e in entries], [e[1].clone() for e in entries], [e[2].clone() for e in entries], rope)
            elif source.is_initialized:
                keys, values = source.view()
                rope = None if source.rope is None else source.rope_positions().clone()
                target.load(keys.clone(), values.clone(), source.kept_positions().clone(), rope)
        return copy

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_peak_nbytes(self) -> int:
        """Most KV bytes held at once so far: the compression peak, or the cache as it is now."""
        return max(self.peak_nbytes, self.nbytes())

    def adopt_windows(self, windows: list[int | None]) -> None:
        """Take the model's sliding windows, one per layer (a cache loaded from a file does not know them)."""
        for layer, window in zip(self.layers, windows, strict=True):
            layer.window = window

    @property
    def windows(self) -> list[int | None]:
        """Per layer, the sliding window of a sliding-window layer; None for a global layer."""
        return [layer.window for layer in self.layers]

    @property
    def compressed_layers(self) -> list[int]:
        """The layers a method compresses, in order: the global ones (sliding-window layers keep their window)."""
        return [i for i, layer in enumerate(self.layers) if layer.window is None]

    def retained_per_layer(self) -> list[int]:
        """Tokens held per layer (window and generated tokens included): the mean over its KV heads,
        rounded, where a per-head split left them unequal (`head_lengths` has each head's)."""
        return [layer.length if not layer.packed else round(layer.mean_length()) for layer in self.layers]

    def head_lengths(self) -> list[list[int]]:
        """Entries held per layer and KV head."""
        return [layer.head_lengths() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of keys and values held over all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self, prompt_len: int) -> int:
        """Bytes the full cache of a `prompt_len`-token prompt holds (what `--method full` keeps:
        every token in a global layer, the window in a sliding-window one), from the stored tensors."""
        return sum(layer.full_length(prompt_len) * layer.entry_nbytes() for layer in self.layers)
