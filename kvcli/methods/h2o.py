"""`h2o`: heavy hitters by attention accumulated over the whole prompt, plus recent tokens.

H2O (Zhang et al., 2023, https://arxiv.org/abs/2306.14048) observes that a few tokens
receive most of the attention from every query ("heavy hitters") and keeps those plus the
most recent tokens. A token's score is the attention it receives summed over all prompt
queries, averaged over the query heads that share its KV head.

Knobs:
- `window_size`: the observation window, always kept: it is H2O's recent part;
- `recent_size`: recent tokens kept unconditionally, window included (in a query-aware read
  whose question is longer than the window, the question is kept whole beside the budget and
  the recent tokens beyond the window are the document's last); None keeps the window
  only, so the rest of the budget goes to heavy hitters;
  `kernel_size` and `pooling` are inherited but unused (H2O does not smooth its scores).

Differences from the reference code (FMInference/H2O), all deliberate:
- the reference splits the budget half heavy hitters, half recent tokens; here the recent
  part is the observation window (or `recent_size`), and the rest goes to heavy hitters;
- the reference evicts greedily while generating; here the prompt is read in one pass and
  the accumulated scores come from all its queries, computed in blocks (never q_len x k_len);
- a prompt read in chunks (`--chunk-size`, past the context) is H2O's greedy eviction one
  chunk at a time: each kept entry carries the attention it has received so far into the next
  chunk's selection (`H2OCompressor`), so a token heavy early stays heavy. While nothing has been
  evicted before the last chunk, the scores and the kept tokens are one pass's; once tokens
  were evicted, later queries attend over the kept ones only (as in the paper's own eviction).
  The question fed after each chunk (the probe) scores that chunk's choice but is not carried:
  it is not a prompt query;
- keys and values are stored once per KV head, scores averaged over its query heads.
Accumulated attention favours early tokens, which more queries can see; that is H2O's
score as published, not corrected here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import accumulated_attention
from ..errors import BudgetError
from .base import BudgetPlan, Compressor, LayerObservation, Method


@dataclass
class H2O(Method):
    """Heavy hitters by accumulated attention plus the recent window (arXiv 2306.14048)."""

    name = "h2o"
    summary = "heavy hitters by attention over the whole prompt, plus recent tokens"
    paper = "https://arxiv.org/abs/2306.14048"
    head_splits = ("equal",)  # see Method.head_splits
    needs_accumulated = True

    recent_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent_size is not None and self.recent_size < self.window_size:
            raise BudgetError(f"--recent-size {self.recent_size} must be at least the window ({self.window_size})")

    def scores(self, obs: LayerObservation) -> torch.Tensor:
        """Attention summed over all prompt queries, mean over each KV head's query heads."""
        if obs.accumulated is None:
            raise ValueError("internal: h2o needs accumulated attention; capture with accumulated=True")
        window = min(self.window_size, obs.k_len)
        scores = obs.accumulated[:, :, : obs.k_len - window].mean(dim=1)  # (num_kv_heads, k_len - window)
        if self.recent_size is not None:
            # Recent tokens just before the window outrank every heavy hitter.
            extra = min(self.recent_size - window, scores.shape[1])
            if extra > 0:
                scores = scores.clone()
                scores[:, scores.shape[1] - extra :] = float("inf")
        return scores

    def compressor(self, plan: BudgetPlan, profile=None) -> Compressor:
        return H2OCompressor(self, plan)

    def params(self) -> dict:
        return {"window_size": self.window_size, "recent_size": self.recent_size}


class H2OCompressor(Compressor):
    """One prefill step of H2O; what it keeps carries its accumulated attention into the next step."""

    method: H2O

    def __init__(self, method: H2O, plan: BudgetPlan, carried: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__(method, plan)
        # compressed-layer rank -> (num_kv_heads, group, n_kept): the attention the entries kept by
        # the previous step received from the prompt's queries so far (they lead the layer's entries).
        self.carried = carried if carried is not None else {}
        self.kept_scores: dict[int, torch.Tensor] = {}
        self._probe_scores: torch.Tensor | None = None  # set by observe_live for the observe it calls

    def next_step(self) -> H2OCompressor:
        return self.carry_to(H2OCompressor(self.method, self.plan, self.kept_scores))

    def observe_live(self, cache, layer_idx: int, query, keys, attn, probe_len: int = 0,
                     accumulated_before=None, queries_before=None) -> None:
        if attn.sliding_window is not None:
            return
        if accumulated_before is None:
            accumulated_before = self.carried.get(cache.compressed_layers.index(layer_idx))
        self._probe_scores = None
        if probe_len:
            # The probe's own attention, to leave out of what the kept entries carry on.
            self._probe_scores = accumulated_attention(query[:, :, -probe_len:], keys, attn)[..., :-probe_len]
        super().observe_live(cache, layer_idx, query, keys, attn, probe_len, accumulated_before, queries_before)

    def observe(self, obs: LayerObservation) -> dict[int, torch.Tensor]:
        decisions = super().observe(obs)
        kept = decisions[obs.layer_idx]  # (num_kv_heads, n_kept) original positions
        local = torch.searchsorted(obs.positions.contiguous(), kept.contiguous())
        scores = obs.accumulated if self._probe_scores is None else obs.accumulated - self._probe_scores
        self.kept_scores[obs.layer_idx] = scores.gather(2, local[:, None, :].expand(-1, scores.shape[1], -1))
        return decisions
