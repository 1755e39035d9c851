"""Where the model looked: the attention a few retrieval heads paid to each cached entry (`--sources`).

An `AttentionAt` is a `Step.watch`: after each layer's attention, before anything is pruned, it
computes the softmax(q.k) of the step's last `rows` queries at the chosen (layer, query head)
pairs (the retrieval heads of the model's profile) and adds it up per ORIGINAL prompt position
(`KVLayer.kept_positions`, so a cache compressed, read once, saved or re-indexed past the context
maps back alike). kvcli's attention runs through SDPA or flash-attn, which return no
probabilities, so they are computed here for those few heads only: for one decoded token that is
a (heads x kept entries) product per chosen layer, a small part of a decode step.
"""

from __future__ import annotations

import torch

from .attention import causal_mask


class AttentionAt:
    """Sums the attention of the last `rows` queries of every watched step, at `heads`, per original position."""

    def __init__(self, heads: list[tuple[int, int]], size: int, rows: int = 1) -> None:
        self.heads_by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            self.heads_by_layer.setdefault(layer, []).append(head)
        self.size = size  # positions counted: the prompt's; the answer's own tokens fall in one extra slot, dropped
        self.rows = rows
        self.totals: torch.Tensor | None = None  # (size + 1,) on the first watched layer's device: no sync per step
        self.steps = 0  # query rows seen at the first watched layer: the answer tokens scored

    def observe(self, layer_idx: int, query: torch.Tensor, cache, attn) -> None:
        heads = self.heads_by_layer.get(layer_idx)
        if not heads:
            return
        layer = cache.layers[layer_idx]
        group = query.shape[1] // layer.num_kv_heads
        rows = min(self.rows, query.shape[2])
        if layer_idx == min(self.heads_by_layer):
            self.steps += rows
        if self.totals is None:
            self.totals = torch.zeros(self.size + 1, dtype=torch.float32, device=query.device)
        by_kv: dict[int, list[int]] = {}
        for head in heads:
            by_kv.setdefault(head // group, []).append(head)
        for kv_head, chosen in by_kv.items():
            # the KV head's keys (this step's entries included) are read in place (no gather of a
            # copy per query head); a packed layer's heads each hold their own number of entries
            keys, _, positions, _ = layer.head_entries(kv_head)  # (1, 1, k_len, head_dim), (k_len,)
            q = query[0, chosen, -rows:].float()  # (heads, rows, head_dim)
            dots = q @ keys[0, 0].float().T  # (heads, rows, k_len)
            probs = _probabilities(dots, attn, torch.tensor(chosen))
            where = positions.clamp(max=self.size)  # the answer's own entries fall in the last slot
            self.totals.index_add_(0, where.to(self.totals.device), probs.sum(dim=(0, 1)).to(self.totals.device))

    def scores(self) -> dict[int, float]:
        """{prompt position: summed attention} for the prompt's positions that drew any."""
        if self.totals is None:
            return {}
        totals = self.totals[: self.size].cpu()
        where = torch.nonzero(totals > 0).flatten().tolist()
        return dict(zip(where, totals[where].tolist()))


def _probabilities(dots: torch.Tensor, attn, heads: torch.Tensor) -> torch.Tensor:
    """The layer's attention (`attention.LayerAttention`: scaling, softcapping, sinks, sliding window)
    of the last `rows` queries from their products `dots` `(heads, rows, k_len)`; query row i sees
    keys up to its own place (bottom-right aligned), within the layer's window."""
    rows, k_len = dots.shape[1], dots.shape[2]
    logits = dots * attn.scaling
    if attn.softcap is not None:
        logits = torch.tanh(logits / attn.softcap) * attn.softcap
    if rows > 1 or (attn.sliding_window is not None and k_len > attn.sliding_window):  # one query sees every key otherwise
        visible = causal_mask(rows, k_len, logits.device, attn.sliding_window)  # (rows, k_len)
        logits = logits.masked_fill(~visible, float("-inf"))
    if attn.sinks is None:
        return logits.softmax(dim=-1)
    sink = attn.sinks.to(logits.device, torch.float32)[heads].view(-1, 1, 1).expand(-1, rows, 1)
    return torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]


def retrieval_heads(profile, num_layers: int, count: int = 8, max_depth: float = 0.75) -> list[tuple[int, int]]:
    """The profile's `count` best (layer, query head) pairs among the first `max_depth` of the
    layers: the heads evidencekv scores its evidence with (its defaults)."""
    max_layer = max(0, int(max_depth * (num_layers - 1)))
    return profile.top_heads(count, max_layer=max_layer)


__all__ = ["AttentionAt", "retrieval_heads"]
