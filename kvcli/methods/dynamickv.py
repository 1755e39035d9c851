"""`dynamickv`: task-aware per-layer budgets re-divided every few layers.

DynamicKV (Zhou et al., 2024, https://arxiv.org/abs/2412.14838). Each layer scores the
tokens outside the observation window by the attention they receive from the window's
queries, pooled over neighbours, and keeps a generous candidate set (up to `max_multiple`
times the average per-layer budget). Every `period` layers, and at the last layer, the
scores of all layers seen so far are pooled, a global top-k of `average x layers seen x heads`
entries is taken, and the whole model's budget is re-divided among the seen layers in
proportion to where the winners fall; each layer is trimmed to its share, keeping its
best-scored candidates. Layers that matter for this prompt keep more. With `head_split=adaptive`
a layer's share x KV heads goes to the best candidates of all its heads together (Ada-KV's split
within the layer; the candidates themselves are each head's top ones, equal per head).

Knobs: `max_multiple` (a layer's candidates, times the mean), `min_multiple` (the least a layer
keeps, times the mean), `period` (layers between re-divisions) and `interim_budget`: what a
re-division before the last layer divides among the layers seen so far. "model" (the default)
gives them the whole model's budget, as the reference code does; it starves no later layer,
since the last re-division divides the budget among all layers again and a layer trimmed
earlier can only pass budget on (tested; on a real prompt interim trims bound no layer's final
share, docs/methods.md). "seen" gives them their own part (mean x layers seen): early layers
are trimmed for good before later ones are scored, for a lower KV peak during prefill.

Differences from the reference code (DreamMr/DynamicKV), all deliberate:
- keys and values are stored once per KV head (the reference stores repeated heads, 4-7x
  the memory on grouped-query models); scores are averaged over each KV head's query heads;
- a layer's share is capped at what it holds and the surplus goes to the other layers (the
  reference can hand a layer more than its candidates, duplicating window rows, and
  silently fall short of the budget);
- every layer keeps at least `min_multiple` times the average (the reference only prints a
  warning when a layer is starved);
- the last re-division runs at the last layer whatever the layer count (the reference only
  re-divides on multiples of 4, so on a 30-layer model the last two layers keep 10x budget);
- the budget counts the window, and the total over layers equals the budget exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import BudgetError
from .allocation import allocate
from .base import BudgetPlan, Compressor, LayerObservation, Method, joint_top, split_winners


@dataclass
class DynamicKV(Method):
    """Per-layer budgets from a global top-k over the layers' window scores (arXiv 2412.14838)."""

    name = "dynamickv"
    summary = "task-aware per-layer budgets, re-divided every few layers"
    paper = "https://arxiv.org/abs/2412.14838"
    head_splits = ("equal", "adaptive")  # a re-division already is a top-k over layers and heads: no global split

    max_multiple: float = 10.0
    min_multiple: float = 0.1
    period: int = 4
    # What an interim re-division (before the last layer) divides among the layers seen so far:
    # "model", the whole model's budget (the reference code's rule), or "seen", their own part
    # of it (mean x layers seen), which trims early layers for good before later ones are seen.
    interim_budget: str = "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_multiple < 1:
            raise BudgetError(f"--max-multiple must be at least 1, got {self.max_multiple}")
        if not 0 <= self.min_multiple <= 1:
            raise BudgetError(f"--min-multiple must be in [0, 1], got {self.min_multiple}")
        if self.period < 1:
            raise BudgetError(f"--period must be at least 1, got {self.period}")
        if self.interim_budget not in ("model", "seen"):
            raise BudgetError(f"--param interim_budget={self.interim_budget}: use model or seen")

    def compressor(self, plan: BudgetPlan, profile=None) -> Compressor:
        return DynamicKVCompressor(self, plan)

    def most_kept(self, plan: BudgetPlan) -> int:
        """A re-division may give one layer up to `max_multiple` times the mean (outside the window)."""
        average = plan.total / plan.num_layers - self.window_size
        return min(plan.prompt_len, math.ceil(self.max_multiple * average) + self.window_size)

    def within(self, plan: BudgetPlan, most: int) -> tuple[DynamicKV, str] | None:
        """The largest `max_multiple` (at least 1) under which no layer holds more than `most`."""
        average = plan.total / plan.num_layers - self.window_size
        if average <= 0:
            return None
        multiple = math.floor((most - self.window_size) / average * 100) / 100
        if multiple < 1 or multiple >= self.max_multiple:
            return None
        return replace(self, max_multiple=multiple), (
            f"max_multiple lowered from {self.max_multiple:g} to {multiple:g}, so that what one layer may keep leaves room "
            "for chunks within the model's positions")


class DynamicKVCompressor(Compressor):
    """Holds each seen layer's scores and candidates until the re-division that trims them."""

    method: DynamicKV

    def __init__(self, method: DynamicKV, plan: BudgetPlan) -> None:
        super().__init__(method, plan)
        window = method.window_size
        # Budget outside the windows: what the re-divisions share among layers.
        self.shared_total = plan.total - plan.num_layers * window
        self.average = self.shared_total / plan.num_layers
        self.scores: dict[int, torch.Tensor] = {}  # layer -> (num_kv_heads, k_len - window)
        self.candidates: dict[int, torch.Tensor] = {}  # layer -> local indices, best first
        self.positions: dict[int, torch.Tensor] = {}  # layer -> (num_kv_heads, k_len)
        self.allocations: list[list[int]] = []  # each re-division's shares, for reports
        self.counts: list[list[int]] = []  # each re-division's global top-k winners per layer
        self.held: dict[int, torch.Tensor] = {}  # adaptive: layer -> (num_kv_heads, k_len - window) bool, the entries it holds

    def observe(self, obs: LayerObservation) -> dict[int, torch.Tensor]:
        layer = obs.layer_idx
        scores = self.method.scores(obs)
        cap = min(math.ceil(self.method.max_multiple * self.average), scores.shape[1])
        self.scores[layer] = scores
        self.positions[layer] = obs.positions
        self.candidates[layer] = scores.topk(cap, dim=-1).indices  # sorted best first
        decisions = {layer: self._kept(layer)}
        last = layer == self.plan.num_layers - 1
        if (layer + 1) % self.method.period == 0 or last:
            decisions.update(self._redivide(layer))
        return decisions

    def _kept(self, layer: int) -> torch.Tensor:
        """Positions a layer holds: its candidates (in position order) and its window."""
        positions = self.positions[layer]
        k_len = positions.shape[1]
        window = min(self.method.window_size, k_len)
        window_index = torch.arange(k_len - window, k_len, device=positions.device).expand(positions.shape[0], -1)
        local = torch.cat([self.candidates[layer].sort(dim=-1).values, window_index], dim=-1)
        return positions.gather(1, local)

    def _redivide(self, upto: int) -> dict[int, torch.Tensor]:
        """Re-divide the budget among layers 0..upto by a global top-k over their scores."""
        layers = list(range(upto + 1))
        num_kv_heads = self.scores[0].shape[0]
        # Layers may sit on different devices (a model split by a device_map): rank on this layer's.
        device = self.scores[upto].device
        flat = torch.cat([self.scores[j].flatten().to(device) for j in layers])
        sizes = torch.tensor([self.scores[j].numel() for j in layers], device=flat.device)
        k = min(round(self.average * num_kv_heads * len(layers)), flat.numel())
        winners = flat.topk(k).indices
        # Which layer each winner falls in, from the cumulative sizes of the flattened layers.
        layer_of = torch.searchsorted(sizes.cumsum(0), winners, right=True)
        counts = torch.bincount(layer_of, minlength=len(layers)).tolist()
        self.counts.append(counts)
        caps = [self._cap(j) for j in layers]
        floor = math.ceil(self.method.min_multiple * self.average)
        total = self.shared_total
        if self.method.interim_budget == "seen":
            total = round(self.average * len(layers))  # the whole budget at the last layer
        shares = allocate(total, counts, caps, [floor] * len(layers))
        self.allocations.append(shares)
        decisions = {}
        for j, share in zip(layers, shares):
            if share < caps[j]:
                decisions[j] = self._trim(j, share)
        return decisions

    def _trim(self, layer: int, share: int) -> torch.Tensor | list[torch.Tensor]:
        """Trim a layer to `share` entries per head outside its window: each head its best
        candidates, or (adaptive) share x heads entries to the best of what all its heads hold."""
        if self.head_split != "adaptive":
            self.candidates[layer] = self.candidates[layer][:, :share]
            return self._kept(layer)
        scores = self.scores[layer]  # (num_kv_heads, k_len - window)
        held = self.held.get(layer)
        if held is None:
            held = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, self.candidates[layer], True)
        winners = joint_top(scores.masked_fill(~held, float("-inf")), share, self.method.head_floor)
        self.held[layer] = torch.zeros_like(held).flatten().scatter_(0, winners, True).view_as(held)
        positions = self.positions[layer]
        return split_winners(winners, scores.shape[1], positions, min(self.method.window_size, positions.shape[1]))

    def _cap(self, layer: int) -> int:
        """Entries per head (the mean, adaptive) a layer holds outside its window: the most a re-division can leave it."""
        held = self.held.get(layer)
        return self.candidates[layer].shape[1] if held is None else int(held.sum()) // held.shape[0]

    def report(self) -> dict:
        return {"redivisions": len(self.allocations)}
