"""`evidencekv`: every layer keeps the tokens the model's retrieval heads point at, plus its own.

Measured on kvcli's small models: per-layer methods (SnapKV, PyramidKV, DynamicKV) lose a
fact at 1-2% of the cache although a few middle-layer heads rank it among their top few dozen
tokens; most layers rank it in the thousands, and decoding needs it in every layer. This
method shares that evidence across layers:

1. A retrieval-head profile (`kvcli/profile.py`, computed once per model on synthetic
   lookups, no user data) names the `num_heads` query heads that best find an asked-for fact,
   among the first `max_depth` of the layers.
2. During prefill those heads' pooled window attention, each normalised to sum to 1, is
   summed per token position: the shared evidence score.
3. Every layer keeps its window, the `shared_fraction` of its remaining budget with the best
   evidence scores (the same tokens in every layer), and fills the rest with its own top
   window-scored tokens (as SnapKV), per KV head. Budgets are equal across layers.

With `head_split=profile` (HeadKV's idea, arXiv 2410.19258, on this profile) step 3 sizes every
KV head of every layer by the profile instead (`profile_budgets`): the heads that find facts keep
more of the same evidence ranking, the others only its top, the layers' budgets x heads in all.

Defaults chosen by measurement: `shared_fraction` 1.0 (all of the budget outside the
window follows the evidence), 8 heads from the first three quarters of the layers, compared
with 0.5 / 0.75, 4 / 16 heads and heads from all layers in needle sweeps on the default model
(`benchmarks/needle_sweep.py`); the resulting comparison with the published methods is in
docs/results.md.

Layers before the last evidence head are held in full until that head has been seen. Read in
one pass, the prefill's KV peak would be those layers' full KV (about `max_depth` of the full
cache: ~12 GB for an 8B model at 128K tokens). So a live read of a prompt of CHUNK_FROM_TOKENS or
more, when no `--chunk-size` is given, goes in chunks (the question probing each, as
`--chunk-size` reads) sized so that the held layers never hold more than PEAK_LAYERS layers'
full KV: the peak stays within the kept cache plus PEAK_LAYERS layers' full KV of the prompt
(`prefill_chunk`; `benchmarks/peak_vs_length.py` measures it). Shorter prompts are read in one
pass, as the accuracy results were measured; the final cache meets the budget either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError
from .base import BudgetPlan, Compressor, LayerObservation, Method, joint_top, split_winners, pool_scores

# Live reads of prompts this long or longer are chunked so that the layers held in full until the
# last evidence head never hold more than PEAK_LAYERS layers' full KV of the prompt.
CHUNK_FROM_TOKENS = 8192
PEAK_LAYERS = 2


@dataclass
class EvidenceKV(Method):
    """Shared evidence from retrieval heads plus each layer's own window scores (kvcli's method)."""

    name = "evidencekv"
    summary = "tokens the model's retrieval heads point at, kept in every layer, plus each layer's own"
    paper = "docs/methods.md#evidencekv"
    needs_profile = True  # the evidence heads, whatever the split
    selects_by_scores = False
    chunks_from_tokens: ClassVar[int | None] = CHUNK_FROM_TOKENS
    # the shared evidence is one ranking for every layer: no global top-k; `profile` sizes each head
    # by the retrieval-head profile (HeadKV's budgets), each keeping the evidence's top to its size
    head_splits = ("equal", "adaptive", "profile")

    shared_fraction: float = 1.0
    num_heads: int = 8
    max_depth: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.shared_fraction <= 1:
            raise BudgetError(f"--shared-fraction must be in [0, 1], got {self.shared_fraction}")
        if self.num_heads < 1:
            raise BudgetError(f"--num-heads must be at least 1, got {self.num_heads}")
        if not 0 < self.max_depth <= 1:
            raise BudgetError(f"--max-depth must be in (0, 1], got {self.max_depth}")

    def idle_knobs(self, repeat: bool = False) -> str:
        if self.head_split == "adaptive" and self.shared_fraction >= 1:
            return (f"head_split={self.head_split} splits nothing at shared_fraction={self.shared_fraction:g}: every head keeps the "
                    "shared evidence alone; a lower shared_fraction leaves part of each layer's budget to split over its heads")
        return super().idle_knobs(repeat)

    def compressor(self, plan: BudgetPlan, profile=None) -> Compressor:
        if profile is None:
            raise BudgetError("internal: evidencekv needs the model's retrieval-head profile (kvcli.profile)")
        return EvidenceCompressor(self, plan, profile)

    def evidence_heads(self, plan: BudgetPlan, profile) -> list[tuple[int, int]]:
        """The (layer, query head) pairs whose window attention is the evidence, among the first `max_depth` of the layers."""
        max_layer = max(0, math.floor(self.max_depth * (plan.num_layers - 1)))
        return profile.top_heads(self.num_heads, max_layer=max_layer)

    def held_layers(self, plan: BudgetPlan, profile) -> int:
        """How many layers hold this step's KV in full when the last evidence head attends."""
        return max(layer for layer, _ in self.evidence_heads(plan, profile)) + 1

    def prefill_chunk(self, plan: BudgetPlan, profile=None, probe_len: int = 0) -> int | None:
        """Chunks of at most PEAK_LAYERS x prompt / held layers tokens (the probe included) for
        prompts of CHUNK_FROM_TOKENS or more: while a chunk is read, the held layers then add at
        most PEAK_LAYERS layers' full KV to the kept cache. None: one pass (a shorter prompt, or
        evidence heads among the first PEAK_LAYERS layers)."""
        if profile is None or plan.prompt_len < CHUNK_FROM_TOKENS:
            return None
        held = self.held_layers(plan, profile)
        if held <= PEAK_LAYERS:
            return None
        return max(2 * self.window_size, PEAK_LAYERS * plan.prompt_len // held - probe_len)


class EvidenceCompressor(Compressor):
    """Defers layers until the last evidence head has been seen, then decides them all."""

    method: EvidenceKV

    def __init__(self, method: EvidenceKV, plan: BudgetPlan, profile) -> None:
        super().__init__(method, plan, profile)
        self.heads_by_layer: dict[int, list[int]] = {}
        for layer, head in method.evidence_heads(plan, profile):
            self.heads_by_layer.setdefault(layer, []).append(head)
        self.last_evidence_layer = max(self.heads_by_layer)
        self.evidence: torch.Tensor | None = None  # (max position + 1,) summed normalised scores
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _add_evidence(self, obs: LayerObservation) -> None:
        window = min(self.method.window_size, obs.k_len)
        k = obs.k_len - window
        attn = obs.window_attn[:, :, -window:, :k].sum(dim=2)  # (num_kv_heads, group, k)
        pooled = pool_scores(attn, self.method.kernel_size, self.method.pooling)
        group = pooled.shape[1]
        positions = obs.positions[:, :k]
        if self.evidence is None:
            self.evidence = torch.zeros(int(obs.positions.max()) + 1, dtype=torch.float32, device=pooled.device)
        for head in self.heads_by_layer[obs.layer_idx]:
            kv_head, within = divmod(head, group)
            row = pooled[kv_head, within]
            # The evidence lives on the first evidence layer's device; later layers may be elsewhere.
            self.evidence.index_add_(0, positions[kv_head].to(self.evidence.device), (row / row.sum().clamp_min(1e-12)).to(self.evidence.device))

    def _decide(self, layer: int, own: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        k_len = positions.shape[1]
        window = min(self.method.window_size, k_len)
        k = k_len - window
        evidence = self.evidence.to(positions.device)[positions[:, :k]]  # (num_kv_heads, k)
        if self.head_split == "profile":
            return self._decide_profile(layer, own, evidence, positions, window)
        n_rest = max(0, min(self.layer_budgets[layer], k_len) - window)
        n_shared = min(round(self.method.shared_fraction * n_rest), k)
        shared = evidence.topk(n_shared, dim=-1).indices
        own = own.clone()
        own.scatter_(1, shared, float("-inf"))
        if self.head_split == "adaptive":
            # every head keeps the shared tokens; the rest of the layer's budget goes to the top own
            # scores of all its heads together, so a head whose scores stand out keeps more
            heads = positions.shape[0]
            rest = joint_top(own, n_rest - n_shared, self.method.head_floor)
            offsets = torch.arange(heads, device=positions.device)[:, None] * k
            return split_winners(torch.cat([(shared + offsets).flatten(), rest]), k, positions, window)
        rest = own.topk(n_rest - n_shared, dim=-1).indices
        window_index = torch.arange(k, k_len, device=positions.device).expand(positions.shape[0], -1)
        local = torch.cat([torch.cat([shared, rest], dim=-1).sort(dim=-1).values, window_index], dim=-1)
        return positions.gather(1, local)

    def _decide_profile(self, layer: int, own: torch.Tensor, evidence: torch.Tensor, positions: torch.Tensor, window: int) -> list[torch.Tensor]:
        """Per KV head, its window and its size from the profile (`Compressor.profile_sizes`):
        `shared_fraction` of it the evidence's top, the rest its own top scores."""
        k = positions.shape[1] - window
        winners = []
        for head, size in enumerate(self.profile_sizes(layer, positions.shape[0], k, window)):
            n_shared = round(self.method.shared_fraction * size)  # sizes are within the k candidates
            shared = evidence[head].topk(n_shared).indices
            mine = own[head].clone()
            mine[shared] = float("-inf")
            winners.append(torch.cat([shared, mine.topk(size - n_shared).indices]) + head * k)
        return split_winners(torch.cat(winners), k, positions, window)

    def observe(self, obs: LayerObservation) -> dict[int, torch.Tensor]:
        layer = obs.layer_idx
        own = self.method.scores(obs)
        if layer in self.heads_by_layer:
            self._add_evidence(obs)
        if layer < self.last_evidence_layer:
            self.pending[layer] = (own, obs.positions)
            return {}
        decisions = {j: self._decide(j, s, p) for j, (s, p) in self.pending.items()}
        self.pending.clear()
        decisions[layer] = self._decide(layer, own, obs.positions)
        return decisions
