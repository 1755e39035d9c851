"""The interface every compression method implements, and what they share.

A method is a small dataclass of the paper's knobs. During prefill, after each layer's
attention, the method's `Compressor` receives a `LayerObservation` (that layer's window
attention and, if asked for, accumulated attention) and answers which token positions each
layer keeps. Positions are original token positions, so a cross-layer method can later trim
an earlier layer to a subset of what it kept. The same compressor runs live (pruning the cache
as prefill goes) and offline (replaying observations captured once, for `kvcli eval`), which
is why both give the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..attention import accumulated_attention, window_attention
from ..errors import BudgetError
from .allocation import allocate, even_split


@dataclass(frozen=True)
class BudgetPlan:
    """How many tokens a prefill may keep, summed over the layers a method compresses (windows
    included): every layer, or a model's global layers when it has sliding-window ones, which
    keep their window outside the plan. Methods number those layers 0..num_layers - 1."""

    num_layers: int
    prompt_len: int
    total: int

    @property
    def average(self) -> float:
        """Mean tokens kept per layer: the paper's "KV cache size"."""
        return self.total / self.num_layers

    @property
    def ratio(self) -> float:
        return self.total / (self.num_layers * self.prompt_len)


DEFAULT_RATIO = 0.1
# Tokens per layer the default ratio never goes below: a document under about 10,000 tokens keeps
# this many (all of it when shorter), where compression saves little memory and cost right
# answers; longer ones compress to the ratio. Chosen by benchmarks/short_docs.py (docs/results.md).
DEFAULT_MIN_KEEP = 1024


@dataclass(frozen=True)
class Budget:
    """`--ratio`, `--budget` and `--min-keep` as the user gave them, checked once.

    Neither --ratio nor --budget: the default ratio, floored at `--min-keep` tokens per layer
    (DEFAULT_MIN_KEEP unless given). An explicit --ratio is floored only when --min-keep is given
    too; an explicit --budget never is. Where the default floor would have kept more than an
    explicit --ratio or --budget, the plan's note says it was not applied.
    """

    ratio: float | None = None
    tokens: int | None = None  # mean tokens kept per layer, window included
    min_keep: int | None = None  # --min-keep as given; None: DEFAULT_MIN_KEEP under the default ratio

    def __post_init__(self) -> None:
        if self.ratio is not None and self.tokens is not None:
            raise BudgetError("give --ratio or --budget, not both")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise BudgetError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.tokens is not None and self.tokens < 1:
            raise BudgetError(f"--budget must be a positive number of tokens per layer, got {self.tokens}")
        if self.min_keep is not None and self.min_keep < 0:
            raise BudgetError(f"--min-keep must be a number of tokens per layer, 0 or more, got {self.min_keep}")

    def check(self, window_size: int) -> None:
        """Refuse an explicit budget that the observation window alone would fill."""
        if self.tokens is not None and self.tokens <= window_size:
            raise BudgetError(
                f"--budget {self.tokens} is not larger than the observation window ({window_size} tokens); "
                f"use --budget {window_size + 1} or more, or a smaller --window"
            )

    @property
    def floor(self) -> int:
        """The fewest tokens per layer this budget keeps (0: no floor)."""
        if self.tokens is not None:
            return 0
        if self.min_keep is not None:
            return self.min_keep
        return DEFAULT_MIN_KEEP if self.ratio is None else 0

    def at_most(self, floor: int) -> Budget:
        """This budget with its floor lowered to `floor` where it is higher."""
        return self if self.floor <= floor else replace(self, min_keep=floor)

    @property
    def label(self) -> str:
        if self.tokens is not None:
            return f"budget {self.tokens}"
        ratio = f"ratio {self.ratio if self.ratio is not None else DEFAULT_RATIO:g}"
        return f"{ratio}, min-keep {self.floor}" if self.floor else ratio

    def plan(self, prompt_len: int, num_layers: int, window_size: int, beside: int = 0) -> tuple[BudgetPlan | None, str]:
        """The tokens a prompt may keep, and a note when that is not what was asked for.

        None (with a note) when the prompt already fits. A ratio that would keep no more than
        the window keeps the window plus one token per layer instead, and says so: a short
        document must simply work with the default settings. `beside`: the window's tokens that
        are a question kept beside this prompt (`question_plan`), for the note.
        """
        self.check(window_size)
        note = ""
        tokens = f"{prompt_len}-token prompt before the question" if beside else f"{prompt_len}-token prompt"
        if self.tokens is not None:
            total = self.tokens * num_layers
            floor = DEFAULT_MIN_KEEP if self.min_keep is None else self.min_keep
            if self.tokens < min(floor, prompt_len):
                note = f"--budget {self.tokens} is below --min-keep {floor}, which floors the default ratio, not --budget"
        else:
            ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
            total = round(ratio * prompt_len * num_layers)
            per_layer = f"ratio {ratio:g} would keep {total / num_layers:.1f} tokens per layer of this {tokens}"
            floor = self.floor if self.floor > window_size else 0  # a floor within the window: the window's own rule below
            if total < floor * num_layers:
                if floor >= prompt_len:
                    return None, f"kept all {prompt_len} tokens{' before the question' if beside else ''}: below --min-keep {floor}"
                return BudgetPlan(num_layers=num_layers, prompt_len=prompt_len, total=floor * num_layers), f"{per_layer}: kept {floor} (--min-keep)"
            least = (window_size + 1) * num_layers
            if total < least:
                if least >= prompt_len * num_layers:
                    return None, f"the {tokens} is too short to compress below its {window_size}-token window"
                if not beside:
                    note = f"{per_layer}, no more than the {window_size}-token window: kept {window_size + 1} per layer"
                elif window_size:
                    note = (f"{per_layer}, no more than the window's {window_size} tokens before the question: kept "
                            f"{window_size + 1} per layer and the question's last {beside} beside them")
                else:
                    note = f"{per_layer}: kept 1 per layer and the question's last {beside} beside it"
                return BudgetPlan(num_layers=num_layers, prompt_len=prompt_len, total=least), note
            if self.min_keep is None and self.ratio is not None and total < min(DEFAULT_MIN_KEEP, prompt_len) * num_layers:
                note = (f"--ratio {ratio:g} keeps {total / num_layers:.0f} per layer, below --min-keep {DEFAULT_MIN_KEEP}, "
                        "which floors only the default ratio unless given")
        if total >= prompt_len * num_layers:
            return None, f"the {tokens} already fits the {self.label}"
        return BudgetPlan(num_layers=num_layers, prompt_len=prompt_len, total=total), note


def question_kept_whole(question: int, window_size: int) -> int:
    """How many of a query-aware read's `question` last tokens are kept whole beside the budget:
    those before the observation window (the window's are scored and kept as every window is)."""
    return max(0, question - window_size)


def question_plan(budget: Budget, prompt_len: int, num_layers: int, window_size: int, question: int = 0) -> tuple[BudgetPlan | None, str]:
    """`budget.plan` for a prompt whose last `question` tokens are a question kept whole
    (`Compression`): the budget is the document's, the prompt before the question (`--budget N`
    keeps N of its tokens per layer, a ratio is of its tokens), and the method's observation
    window, the question's end, is kept beside it with the question's other tokens. The plan's
    prompt is what the method sees as candidates and window (the question's tokens before the
    window are neither), its total the budget plus the window's question tokens per layer."""
    if question <= 0:
        return budget.plan(prompt_len, num_layers, window_size)
    budget.check(window_size)  # --budget must pass the whole window, whatever the question's share of it
    window = min(window_size, question)
    # a question shorter than the window leaves the window's first tokens in the document: they count in its budget
    plan, note = budget.plan(prompt_len - question, num_layers, window_size - window, beside=window)
    if plan is None:
        return None, note
    kept_whole = question_kept_whole(question, window_size)
    return BudgetPlan(num_layers=num_layers, prompt_len=prompt_len - kept_whole, total=plan.total + window * num_layers), note


def plan_budget(prompt_len: int, num_layers: int, *, window_size: int, ratio: float | None = None, budget: int | None = None,
                min_keep: int | None = None) -> BudgetPlan | None:
    """`Budget(ratio, budget, min_keep).plan(...)` without its note; None when the prompt already fits."""
    return Budget(ratio, budget, min_keep).plan(prompt_len, num_layers, window_size)[0]


@dataclass
class LayerObservation:
    """What one layer's prefill step shows a method. k_len counts every entry the layer holds."""

    # The model's layer index as the engine records it; the method sees the layer's index among
    # the layers it compresses (`Compressor.prune`), the same unless the model has sliding-window layers.
    layer_idx: int
    positions: torch.Tensor  # (num_kv_heads, k_len) original token positions, sorted per head
    window_attn: torch.Tensor  # (num_kv_heads, group, window, k_len) float32 probabilities
    accumulated: torch.Tensor | None = None  # (num_kv_heads, group, k_len) attention summed over all queries
    # (num_kv_heads, group, k_len) float32: each entry's score from another pass than the window
    # (the repeat scorer's peak attention, kvcli/repeat.py); `Method.scores` ranks by it when set.
    key_scores: torch.Tensor | None = None

    @property
    def k_len(self) -> int:
        return self.positions.shape[1]

    def drop_tail(self, n: int) -> LayerObservation:
        """The same observation without the last `n` entries as candidates (their queries still score)."""
        keep = self.k_len - n
        return LayerObservation(
            layer_idx=self.layer_idx,
            positions=self.positions[:, :keep],
            window_attn=self.window_attn[..., :keep],
            accumulated=None if self.accumulated is None else self.accumulated[..., :keep],
            key_scores=None if self.key_scores is None else self.key_scores[..., :keep],
        )

    @classmethod
    def compute(cls, layer_idx: int, query, keys, positions, attn, window_size: int, accumulated: bool,
                window_query=None) -> LayerObservation:
        """`attn` is how the layer attends (`attention.LayerAttention`, or a bare scaling);
        `window_query` (default: `query`) are the last queries of the prompt, this step's and
        any kept from earlier steps; accumulated attention counts this step's queries only."""
        return cls(
            layer_idx=layer_idx,
            positions=positions,
            window_attn=window_attention(query if window_query is None else window_query, keys, window_size, attn),
            accumulated=accumulated_attention(query, keys, attn) if accumulated else None,
        )


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Smooth scores over neighbouring positions along the last dim, keeping its length."""
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad)
    elif pooling == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        raise BudgetError(f"unknown pooling {pooling!r}; use avg or max")
    return pooled[..., : shape[-1]].reshape(shape)


def keep_window_and_top(scores: torch.Tensor, n_kept: int, positions: torch.Tensor, window_size: int) -> torch.Tensor:
    """Positions `(num_kv_heads, n_kept)` kept: the last `window_size` entries plus the top-scored rest.

    `scores` `(num_kv_heads, k_len - window_size)` rate the entries outside the window.
    """
    k_len = positions.shape[1]
    window = min(window_size, k_len)
    n_kept = min(n_kept, k_len)
    n_top = max(0, n_kept - window)
    top = scores.topk(n_top, dim=-1).indices if n_top else scores.new_empty((scores.shape[0], 0), dtype=torch.long)
    window_index = torch.arange(k_len - window, k_len, device=positions.device).expand(positions.shape[0], -1)
    local = torch.cat([top.sort(dim=-1).values, window_index], dim=-1)
    return positions.gather(1, local)


HEAD_SPLITS = ("equal", "adaptive", "global", "profile")
# Under head_split=profile, the most one head keeps outside its window, in multiples of its
# layer's equal share: the profile's best heads would otherwise take most of the budget.
PROFILE_CAP = 4


def profile_weights(profile, num_layers: int, num_kv_heads: int) -> list[list[float]]:
    """Per layer and KV head, the profile's weight of the head (after HeadKV): 2 ** score, the mean
    1 / (rank + 1) of the asked-for fact in the lookups, geometrically; the best of the query heads
    sharing the KV head."""
    rows = profile.scores[:num_layers]  # plain floats: no tensor on whatever device a loader made the default
    width = len(rows[0]) if rows else 0
    if len(rows) != num_layers or width % num_kv_heads or any(len(row) != width for row in rows):
        raise BudgetError(f"internal: the profile has {len(rows)} layers of {width} heads, the cache {num_layers} layers of {num_kv_heads} KV heads")
    group = width // num_kv_heads
    return [[2.0 ** max(row[h * group : (h + 1) * group]) for h in range(num_kv_heads)] for row in rows]


def profile_budgets(weights: list[list[float]], shares: list[int], head_floor: float, candidates: list[int],
                    total: int | None = None) -> list[list[int]]:
    """Entries each KV head keeps outside its window under head_split=profile: `total` (default the
    layers' `shares` x heads) in all, every head first `head_floor` of its layer's share, the rest
    in proportion to its `weights` (`profile_weights`), none past PROFILE_CAP times its layer's share
    or its layer's `candidates`."""
    heads = len(weights[0])
    caps = [min(most, PROFILE_CAP * share) for share, most in zip(shares, candidates) for _ in range(heads)]
    floors = [round(head_floor * share) for share in shares for _ in range(heads)]
    sizes = allocate(sum(shares) * heads if total is None else total, [w for row in weights for w in row], caps, floors)
    return [sizes[i : i + heads] for i in range(0, len(sizes), heads)]


def keep_sized(scores: torch.Tensor, sizes: list[int], positions: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Per KV head h, the positions kept: its top `sizes[h]` of `scores` `(num_kv_heads, k_len - window)`,
    in position order, then its last `window` entries (`split_winners`)."""
    k = scores.shape[1]
    winners = torch.cat([scores[h].topk(min(n, k)).indices + h * k for h, n in enumerate(sizes)])
    return split_winners(winners, k, positions, window)


def floored(scores: torch.Tensor, floor: int) -> torch.Tensor:
    """`scores` `(num_kv_heads, n)` with each head's `floor` best raised to +inf, so that a top-k
    over several heads at once (the adaptive and global splits) gives every head at least those
    (Ada-KV's safeguard): without it a few heads can take a layer's whole budget and the others
    keep their window alone."""
    floor = min(floor, scores.shape[-1])
    if floor <= 0:
        return scores
    top = scores.topk(floor, dim=-1)
    # an entry scored -inf is one the caller ruled out (not held, or kept already): never raised
    return scores.scatter(-1, top.indices, torch.where(top.values > float("-inf"), float("inf"), top.values))


def head_floor_entries(head_floor: float, n_kept: int, k_len: int, window: int) -> int:
    """Entries outside its window each head is sure to keep: `head_floor` of an equal split's."""
    return round(head_floor * max(0, min(n_kept, k_len) - window))


def joint_top(scores: torch.Tensor, per_head: int, head_floor: float = 0.0) -> torch.Tensor:
    """Flat indices (heads one after another) of the `per_head` x num_kv_heads best of `scores`
    `(num_kv_heads, n)` taken over every head at once (Ada-KV's adaptive split), each head first
    sure of `head_floor` x `per_head` of its own best."""
    return floored(scores, round(head_floor * per_head)).flatten().topk(per_head * scores.shape[0]).indices


def keep_split(scores: torch.Tensor, n_kept: int, positions: torch.Tensor, window_size: int, head_floor: float = 0.0) -> list[torch.Tensor]:
    """Per KV head, the positions `(n_h,)` kept when a layer's `n_kept` x num_kv_heads entries
    (windows included) go to the top scores of all its heads together (Ada-KV's adaptive split):
    every head keeps its last `window_size` entries and `head_floor` of an equal split's other
    entries, and a head whose scores stand out keeps more.

    `scores` `(num_kv_heads, k_len - window_size)` rate the entries outside the window.
    """
    k_len = positions.shape[1]
    window = min(window_size, k_len)
    winners = joint_top(scores, max(0, min(n_kept, k_len) - window), head_floor)
    return split_winners(winners, scores.shape[1], positions, window)


def split_winners(winners: torch.Tensor, width: int, positions: torch.Tensor, window: int) -> list[torch.Tensor]:
    """The positions kept per KV head: each head's `winners` (flat indices into its `width` scored
    entries, heads one after another) in position order, then its last `window` entries."""
    num_kv_heads, k_len = positions.shape
    head_of = winners // max(1, width)
    kept = []
    for h in range(num_kv_heads):
        local = (winners[head_of == h] - h * width).sort().values
        local = torch.cat([local, torch.arange(k_len - window, k_len, device=positions.device)])
        kept.append(positions[h, local])
    return kept


def keep_global(layers: list[tuple[torch.Tensor, torch.Tensor]], total: int, window_size: int,
                floors: list[int] | None = None) -> list[list[torch.Tensor]]:
    """Per layer and KV head, the positions kept by one top-k over every layer and head (KVzip's
    split): `layers` holds each layer's (scores `(num_kv_heads, k_len - window)`, positions
    `(num_kv_heads, k_len)`); `total` entries per head are kept in all, summed over layers (windows
    included), so the mean over heads and layers is the budget's. Every head keeps its window and,
    with `floors` (one per layer), that many of its best other entries."""
    windows = [min(window_size, positions.shape[1]) for _, positions in layers]
    num_kv_heads = layers[0][1].shape[0]
    # Layers may sit on different devices (a model split by a device_map): rank on the last one's.
    device = layers[-1][0].device
    floors = floors or [0] * len(layers)
    flat = torch.cat([floored(scores, floor).flatten().to(device) for (scores, _), floor in zip(layers, floors)])
    n_top = min(max(0, total - sum(windows)) * num_kv_heads, flat.numel())
    winners = flat.topk(n_top).indices
    kept = []
    start = 0
    for (scores, positions), window in zip(layers, windows):
        size = scores.numel()
        mine = winners[(winners >= start) & (winners < start + size)] - start
        kept.append(split_winners(mine.to(positions.device), scores.shape[1], positions, window))
        start += size
    return kept


def with_tail(positions: torch.Tensor | list[torch.Tensor], tail: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """Kept `positions` (`(num_kv_heads, n)`, or `(n_h,)` per head) and the `tail` `(num_kv_heads, m)`
    after them: the prompt's last entries, later than any other, so each head stays sorted."""
    if isinstance(positions, (list, tuple)):
        return [torch.cat([kept, tail[h].to(kept.device)]) for h, kept in enumerate(positions)]
    return torch.cat([positions, tail.to(positions.device)], dim=1)


@dataclass(frozen=True)
class Compression:
    """What a compressing read needs: the method, its budget for this prompt, the model's profile,
    and how many of the prompt's last tokens are the question.

    A query-aware read keeps its question whole, beside the budget (`question_plan`): the
    window's queries score as always, and the question's tokens are never candidates, so at a
    small budget the question does not crowd the document out (docs/methods.md). A
    question-agnostic prefix has no question (0): the question fed after it is kept whole too.
    """

    method: Method
    plan: BudgetPlan
    profile: object = None  # RetrievalProfile when `method.needs_profile`
    question: int = 0  # the prompt's last tokens that are the question (its chat template's closing included)

    @property
    def kept_whole(self) -> int:
        """The question's tokens before the observation window: kept, beside the budget."""
        return question_kept_whole(self.question, self.method.window_size)

    def compressor(self) -> Compressor:
        """A fresh compressor: one per prefill step (a chunked read starts one per chunk)."""
        compressor = self.method.compressor(self.plan, self.profile)
        compressor.kept_whole = self.kept_whole
        return compressor


class Compressor:
    """One prefill's run of a method: observes layers in order, decides what each keeps."""

    def __init__(self, method: Method, plan: BudgetPlan, profile=None) -> None:
        self.method = method
        self.plan = plan
        self.profile = profile  # the model's RetrievalProfile, for methods that need one
        self.layer_budgets = method.layer_budgets(plan)
        # How a layer's budget is split over its KV heads (`Method.head_split`). A read in chunks
        # splits per head at its last step only (`prefill` sets `last_step`): a layer whose heads
        # hold different numbers of entries is never compressed again.
        self.last_step = True
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the global split's layers, held until the last
        self.head_budgets: list[list[int]] | None = None  # head_split=profile: entries outside the window, per layer and KV head
        # The entries each layer holds before this step decides, where known before the first layer
        # is decided (`repeat.keep_by_scores`); None: every layer holds what the first one does (one pass).
        self.entries_held: list[int] | None = None
        # The prompt's last entries kept beside the budget at the last step (`Compression.kept_whole`:
        # a query-aware read's question before its window); they are not candidates.
        self.kept_whole = 0

    @property
    def head_split(self) -> str:
        return self.method.head_split if self.last_step else "equal"

    def select(self, layer: int, scores: torch.Tensor, positions: torch.Tensor) -> dict[int, torch.Tensor | list[torch.Tensor]]:
        """The positions kept `{layer: (num_kv_heads, n_kept) or (n_h,) per head}` by the method's
        head split, from a layer's `scores` `(num_kv_heads, k_len - window)`: at once, or for
        every layer at the last one under the global split."""
        n_kept = self.layer_budgets[layer]
        window_size = self.method.window_size
        split = self.head_split
        if split == "equal":
            return {layer: keep_window_and_top(scores, n_kept, positions, window_size)}
        head_floor = self.method.head_floor
        if split == "adaptive":
            return {layer: keep_split(scores, n_kept, positions, window_size, head_floor)}
        if split == "profile":
            window = min(window_size, positions.shape[1])
            return {layer: keep_sized(scores, self.profile_sizes(layer, positions.shape[0], scores.shape[1], window), positions, window)}
        self.pending[layer] = (scores, positions)
        if layer < self.plan.num_layers - 1:
            return {}
        layers = sorted(self.pending)
        floors = [head_floor_entries(head_floor, self.layer_budgets[j], self.pending[j][1].shape[1], min(window_size, self.pending[j][1].shape[1]))
                  for j in layers]
        kept = keep_global([self.pending[j] for j in layers], sum(self.layer_budgets[j] for j in layers), window_size, floors)
        self.pending.clear()
        return dict(zip(layers, kept))

    def profile_sizes(self, layer: int, num_kv_heads: int, candidates: int, window: int) -> list[int]:
        """head_split=profile: the entries outside its window each KV head of `layer` keeps
        (`profile_budgets`), planned for every layer at the first one decided, each layer's
        candidates those `entries_held` says or, in one pass, the first layer's `candidates`. A head
        planned more than its layer turns out to hold keeps all it holds, and what it could not keep
        goes to the layers decided after it."""
        if self.head_budgets is None:
            if self.profile is None:
                raise BudgetError("internal: head_split=profile needs the model's retrieval-head profile (kvcli.profile)")
            layers = len(self.layer_budgets)
            self.head_weights = profile_weights(self.profile, layers, num_kv_heads)
            self.head_shares = [max(0, b - window) for b in self.layer_budgets]
            held = self.entries_held
            self.head_candidates = [max(0, n - window) for n in held] if held else [candidates] * layers
            self.head_budgets = profile_budgets(self.head_weights, self.head_shares, self.method.head_floor, self.head_candidates)
        planned = self.head_budgets[layer]
        sizes = [min(n, candidates) for n in planned]
        surplus = sum(planned) - sum(sizes)
        if surplus and layer + 1 < len(self.head_budgets):
            later = slice(layer + 1, None)
            self.head_budgets[later] = profile_budgets(self.head_weights[later], self.head_shares[later], self.method.head_floor,
                                                       self.head_candidates[later], total=sum(map(sum, self.head_budgets[later])) + surplus)
        return sizes

    def next_step(self) -> Compressor:
        """The compressor for the next prefill step of the same read (a chunked read's next chunk):
        a fresh one, unless the method carries something from step to step (H2O's scores)."""
        return self.carry_to(self.method.compressor(self.plan, self.profile))

    def carry_to(self, following: Compressor) -> Compressor:
        """`following`, the next step's compressor, told what every step of this read shares."""
        following.kept_whole = self.kept_whole
        return following

    def observe(self, obs: LayerObservation) -> dict[int, torch.Tensor]:
        """Positions to keep `{layer_idx: (num_kv_heads, n_kept)}` after seeing layer `obs.layer_idx`."""
        return self.select(obs.layer_idx, self.method.scores(obs), obs.positions)

    def prune(self, cache, obs: LayerObservation) -> None:
        """Observe model layer `obs.layer_idx` of `cache` and prune the layers the method decides.

        The method sees the layer's index among the cache's compressed layers (its global
        layers): budgets, depth ramps and re-divisions run over those alone.
        """
        compressed = cache.compressed_layers
        try:
            rank = compressed.index(obs.layer_idx)
        except ValueError:
            raise BudgetError(f"internal: layer {obs.layer_idx} is a sliding-window layer, which no method compresses") from None
        if len(compressed) != self.plan.num_layers:
            raise BudgetError(f"internal: the plan is for {self.plan.num_layers} layers, the cache compresses {len(compressed)}")
        whole = min(self.kept_whole, obs.k_len) if self.last_step else 0
        tail = None
        if whole:
            tail = obs.positions[:, obs.k_len - whole :]  # (num_kv_heads, whole): the same positions in every layer
            obs = obs.drop_tail(whole)
        for target, positions in self.observe(replace(obs, layer_idx=rank)).items():
            cache.layers[compressed[target]].keep_positions(with_tail(positions, tail) if whole else positions)

    def observe_live(self, cache, layer_idx: int, query, keys, attn, probe_len: int = 0,
                     accumulated_before=None, queries_before=None) -> None:
        """Observe a layer during prefill and prune the live cache as decided.

        `attn` (`attention.LayerAttention`) is how the layer attended: a sliding-window layer is
        left alone (the step keeps its window). After a read-once prefix, `queries_before`
        `(1, num_heads, w, head_dim)` are the prefix's last queries (so a short question still
        has a whole observation window) and `accumulated_before` `(num_kv_heads, group, n)` the
        attention the prefix's entries received from its own queries: the scores then equal one pass's.
        """
        if attn.sliding_window is not None:
            return
        layer = cache.layers[layer_idx]
        window_query = query
        if queries_before is not None and query.shape[2] < self.method.window_size:
            window_query = torch.cat([queries_before.to(query.device, query.dtype), query], dim=2)
        obs = LayerObservation.compute(
            layer_idx, query, keys, layer.kept_positions(), attn, self.method.window_size, self.method.needs_accumulated,
            window_query=window_query,
        )
        if obs.accumulated is not None and accumulated_before is not None:
            obs.accumulated[..., : accumulated_before.shape[-1]] += accumulated_before.to(obs.accumulated.device)
        if probe_len:
            # The probe (the question fed after a chunk) scored the chunk; it is not kept.
            obs = obs.drop_tail(probe_len)
        self.prune(cache, obs)


def _either(choices) -> str:
    """"a", "a or b", "a, b or c"."""
    choices = list(choices)
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


@dataclass
class Method:
    """Base of every compression method: the knobs shared by window-scored methods."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    compresses: ClassVar[bool] = True
    needs_accumulated: ClassVar[bool] = False
    selects_by_scores: ClassVar[bool] = True  # kept tokens outside the window are the top of `scores`
    chunks_from_tokens: ClassVar[int | None] = None  # prompts this long may be read in chunks by `prefill_chunk`

    # The splits of a layer's budget over its KV heads this method can use (HEAD_SPLITS); a method
    # whose choices depend on equal heads (a cross-layer re-division, carried scores) has "equal" only.
    head_splits: ClassVar[tuple[str, ...]] = HEAD_SPLITS

    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "avg"
    # How each layer's budget goes to its KV heads: `equal` (the same number each), `adaptive`
    # (the top scores of all the layer's heads together, Ada-KV), `global` (one top-k over every
    # layer and head, KVzip; the layers are held in full until the last is scored). The budget is
    # the mean over layers and heads either way; uneven heads are stored without padding.
    head_split: str = "equal"
    # Under the adaptive and global splits, the share of an equal split's entries (outside the
    # window) every head keeps whatever the others score (Ada-KV's safeguard); 0: none.
    head_floor: float = 0.0
    # With the repeat scorer (a question-agnostic cache: `compress`, `ask --reuse`): first keep this
    # many times the budget (DynamicKV's layer budgets, heads equal), repeat the document again over
    # what is kept, and keep the budget by that second repeat's scores; 0: one repeat (KVzip's).
    rescore: float = 0.0
    # With the repeat scorer: each entry's score from the repeat over the whole prefix (with
    # `rescore`, the first) times (1 + its token's surprisal in nats, when the prefix was read) to
    # this power, so that what the model could not have predicted (names, numbers) outranks what it
    # can (kvcli/repeat.py); 0: the repeat's scores alone.
    surprisal: float = 0.0

    def __post_init__(self) -> None:
        if self.head_split not in self.head_splits:
            raise BudgetError(f"--param head_split={self.head_split}: {self.name} splits heads {_either(self.head_splits)}")
        if not 0.0 <= self.head_floor <= 1.0:
            raise BudgetError(f"--param head_floor must be between 0 and 1, got {self.head_floor}")
        if self.rescore != 0 and not self.rescore > 1:
            raise BudgetError(f"--param rescore must be 0 (one repeat) or above 1 (times the budget kept before the second repeat), got {self.rescore}")
        if not 0.0 <= self.surprisal <= 4.0:
            raise BudgetError(f"--param surprisal must be between 0 (the repeat's scores alone) and 4 (the power of each token's surprisal), got {self.surprisal}")
        if self.window_size < 1:
            raise BudgetError(f"--window must be at least 1, got {self.window_size}")
        if self.kernel_size < 1:
            raise BudgetError(f"--kernel-size must be at least 1, got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise BudgetError(f"--pooling must be avg or max, got {self.pooling!r}")

    @property
    def needs_profile(self) -> bool:
        """Whether its compressor needs the model's retrieval-head profile (kvcli/profile.py): the profile split's sizes."""
        return self.head_split == "profile"

    def scores(self, obs: LayerObservation) -> torch.Tensor:
        """Scores `(num_kv_heads, k_len - window)` of the entries outside the window.

        Default: attention from the window's queries summed over the window (as the DynamicKV
        and SnapKV reference code do), pooled over neighbours per query head, then averaged
        over the query heads that share each KV head. With `obs.key_scores` (a question-agnostic
        pass, `--scorer repeat`) those are pooled the same way and the max is taken over the
        query heads of each KV head instead: an entry that one head needs is kept (as KVzip does).
        """
        window = min(self.window_size, obs.k_len)
        if obs.key_scores is not None:
            keyed = obs.key_scores[..., : obs.k_len - window]  # (num_kv_heads, group, k_len - window)
            return pool_scores(keyed, self.kernel_size, self.pooling).amax(dim=1)
        attn = obs.window_attn[:, :, -window:, : obs.k_len - window].sum(dim=2)  # (num_kv_heads, group, k_len - window)
        return pool_scores(attn, self.kernel_size, self.pooling).mean(dim=1)

    @property
    def takes_key_scores(self) -> bool:
        """Whether the method can rank by `LayerObservation.key_scores` (the repeat scorer): those
        that score with `Method.scores`. A method overriding `scores` (H2O's all-query sums,
        StreamingLLM's positions) is refused for it unless it overrides this too."""
        return type(self).scores is Method.scores

    def layer_budgets(self, plan: BudgetPlan) -> list[int]:
        """Tokens each layer keeps (windows included); the default splits the total evenly."""
        return even_split(plan.total, plan.num_layers)

    def compressor(self, plan: BudgetPlan, profile=None) -> Compressor:
        return Compressor(self, plan, profile)

    def most_kept(self, plan: BudgetPlan) -> int:
        """The most entries one layer may hold once a prefill step is compressed (window included).
        A per-head split acts at a read's last step only, on entries already placed, so a head it
        gives more never needs positions beyond what the steps before placed."""
        return max(self.layer_budgets(plan))

    def within(self, plan: BudgetPlan, most: int) -> tuple[Method, str] | None:
        """A variant of this method whose layers hold at most `most` entries under `plan`, and a
        note saying what changed; None when it has no such knob (its `most_kept` is its budget)."""
        return None

    def prefill_chunk(self, plan: BudgetPlan, profile=None, probe_len: int = 0) -> int | None:
        """The chunk size a live read of `plan.prompt_len` tokens uses when none is asked for, so
        that the prefill's KV peak stays within the kept cache plus a few layers' full KV (a
        method that holds layers in full until it can decide them: evidencekv); None: one pass.
        `probe_len` is the question fed after each chunk."""
        return None

    def idle_knobs(self, repeat: bool = False) -> str:
        """A note naming a knob that is set but changes nothing in this setting (for the report), or "".
        `repeat`: whether the repeat scorer ranks this read (`rescore` and `surprisal` act only then)."""
        notes = []
        if self.head_floor and self.head_split == "equal" and len(self.head_splits) > 1:
            notes.append(f"head_floor={self.head_floor:g} acts only with head_split={_either(s for s in self.head_splits if s != 'equal')}")
        if self.rescore and not repeat:
            notes.append(f"rescore={self.rescore:g} acts only on a cache the repeat scorer ranks (compress, ask --reuse)")
        if self.surprisal and not repeat:
            notes.append(f"surprisal={self.surprisal:g} acts only on a cache the repeat scorer ranks (compress, ask --reuse)")
        return "; ".join(notes)

    def params(self) -> dict:
        """The method's knobs and their values, for reports (`head_split` where it has a choice,
        `rescore` and `surprisal` where the repeat scorer can rank for it)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("head_split", "head_floor") or len(self.head_splits) > 1}
        if not self.takes_key_scores:
            shown.pop("rescore")
            shown.pop("surprisal")
        return shown


__all__ = [
    "DEFAULT_MIN_KEEP",
    "DEFAULT_RATIO",
    "HEAD_SPLITS",
    "Budget",
    "BudgetPlan",
    "Compression",
    "Compressor",
    "LayerObservation",
    "Method",
    "field",
    "PROFILE_CAP",
    "keep_global",
    "keep_sized",
    "profile_budgets",
    "profile_weights",
    "floored",
    "head_floor_entries",
    "joint_top",
    "keep_split",
    "split_winners",
    "with_tail",
    "keep_window_and_top",
    "plan_budget",
    "question_kept_whole",
    "question_plan",
    "pool_scores",
]
