"""Skim: read the whole prompt through the first layers only, and the rest of the model over the
tokens the question needs.

A prefill's cost is every token through every layer. A few attention heads in the early layers
already find what a question asks for (the retrieval-head profile, `kvcli/profile.py`, names
them per model), so a skim reads in two passes:

1. The filter: the prompt goes through the layers up to the deepest filter head and no further
   (`step.FilterDone` ends the forward there). The question's last `window` queries at the filter
   heads score every earlier token (pooled, each head's scores normalised to sum to 1, summed over
   heads): the same evidence score `evidencekv` uses. A prompt read in chunks (`--chunk-size`, or
   past the model's positions) is filtered chunk by chunk, the question probing each chunk and the
   filter layers' caches compressed and re-indexed as a chunked read does; a token's score is the
   best any chunk gave it.
2. The read: the chosen tokens (the prompt's head before the documents, the best-scored `tokens`
   of the rest, and the question) go through the whole model again from their embeddings, at
   their original positions (or packed one after another: `positions="packed"`, forced past the
   model's positions), into a fresh cache that the method compresses to the budget as usual.

Re-reading the chosen tokens from the embeddings (GemFilter, arXiv 2409.17422) rather than carrying
their hidden states on from the filter layer (FastKV, arXiv 2502.01068) keeps the model whole: no
layer is skipped inside a forward, so every architecture kvcli reads, chunks and re-indexing
included, skims the same way. With every token chosen, the read is the one-pass read itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .attention import window_attention
from .cache import KVCache
from .generate import Prefill, announce_chunk, chunk_bounds, forward, new_cache
from .methods import BudgetPlan, Compression
from .methods.base import pool_scores
from .step import FilterDone

# Leading tokens that always continue: the attention sinks every later layer leans on.
SINK_TOKENS = 4


@dataclass(frozen=True)
class SkimPlan:
    """Which heads filter, how deep the filter reads, and how many tokens go on."""

    heads: tuple[tuple[int, int], ...]  # (model layer, query head) whose window attention scores tokens
    tokens: int  # document tokens that continue (besides the prompt's head and the question)
    window: int = 8  # the question's last queries that score (the window the profile was measured with)
    kernel_size: int = 7  # neighbouring scores pooled, as the evidence score does
    positions: str = "original"  # where the chosen tokens are read: "original" or "packed" (0, 1, 2, ...)
    span: int = 16  # tokens are chosen in runs of this many

    @property
    def stop_layer(self) -> int:
        """The deepest layer the filter reads: the last filter head's."""
        return max(layer for layer, _ in self.heads)

    def heads_by_layer(self) -> dict[int, list[int]]:
        grouped: dict[int, list[int]] = {}
        for layer, head in self.heads:
            grouped.setdefault(layer, []).append(head)
        return grouped


class Filter:
    """Stands beside a compressor in the filter pass (`Step.skim`): adds each filter head's
    normalised window scores per original position, and ends the pass after `stop_layer`."""

    def __init__(self, plan: SkimPlan, prompt_len: int, device) -> None:
        self.plan = plan
        self.heads = plan.heads_by_layer()
        self.stop_layer = plan.stop_layer
        self.best = torch.zeros(prompt_len, dtype=torch.float32, device=device)  # (prompt_len,) the best score any chunk gave
        self.this_chunk = torch.zeros_like(self.best)

    def observe(self, cache: KVCache, layer_idx: int, query: torch.Tensor, attn, probe_len: int) -> None:
        heads = self.heads.get(layer_idx)
        if not heads:
            return
        layer = cache.layers[layer_idx]
        keys, _ = layer.view()
        positions = layer.kept_positions()  # (num_kv_heads, k_len) original positions
        k = keys.shape[2] - probe_len  # the probe (the question after a chunk) scores, it is not a candidate
        probs = window_attention(query, keys, self.plan.window, attn)[..., :k].sum(dim=2)  # (num_kv_heads, group, k)
        pooled = pool_scores(probs, self.plan.kernel_size, "avg")
        group = pooled.shape[1]
        for head in heads:
            kv_head, within = divmod(head, group)
            row = pooled[kv_head, within]
            self.this_chunk.index_add_(0, positions[kv_head, :k].to(self.best.device), (row / row.sum().clamp_min(1e-12)).to(self.best.device))

    def end_chunk(self) -> None:
        torch.maximum(self.best, self.this_chunk, out=self.best)
        self.this_chunk.zero_()


@dataclass
class SkimRead:
    """What a skim did, for the report: the filter's depth, the tokens that went on, each part's time."""

    filter_layers: int  # layers the filter read (the deepest filter head's, plus one)
    num_layers: int
    prompt_tokens: int
    continued: int  # tokens read through every layer (head, chosen, question)
    filter_s: float
    read_s: float
    chunks: int  # the filter's chunks
    positions: str
    chosen: torch.Tensor = field(repr=False)  # (continued,) the original positions read through every layer

    def to_dict(self) -> dict:
        return {
            "filter_layers": self.filter_layers, "layers": self.num_layers, "prompt_tokens": self.prompt_tokens,
            "continued_tokens": self.continued, "filter_s": round(self.filter_s, 3), "read_s": round(self.read_s, 3),
            "filter_chunks": self.chunks, "positions": self.positions,
        }


class _Filtered:
    """The filter layers of a cache, as a `Reindexer` packs them (the deeper layers stay empty)."""

    def __init__(self, cache: KVCache, count: int) -> None:
        self.layers = cache.layers[:count]


def choose_tokens(scores: torch.Tensor, head: int, tail: int, tokens: int, span: int = 1,
                  starts: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted positions `(m,)` read through every layer: the first `head` tokens, `tokens` of those
    between them and the last `tail` (the question), and those `tail`.

    The best-scored token not chosen yet brings its run, then the next, until `tokens` are chosen
    (the last run may be cut): a fact goes on whole with its neighbours, not only the few tokens
    its question looked at. A run is the stretch between two of `starts` (sorted positions where
    a sentence or line begins, from the reading layer), else the `span` tokens centred on the token."""
    n = scores.shape[0]
    head = min(max(head, SINK_TOKENS), n - tail)
    middle = scores[head : n - tail].float()
    size = middle.shape[0]
    tokens = min(tokens, size)
    taken = torch.zeros(size, dtype=torch.bool)
    edges = None
    if starts is not None:
        inside = starts[(starts > head) & (starts < n - tail)].cpu() - head
        edges = torch.cat([torch.tensor([0]), inside, torch.tensor([size])]).unique()
    order: list[int] = []
    before, after = (span - 1) // 2, span // 2 + 1
    for best in middle.argsort(descending=True, stable=True).tolist():
        if len(order) >= tokens:
            break
        if taken[best]:
            continue
        if edges is None:
            run = torch.arange(max(0, best - before), min(size, best + after))
        else:
            at = int(torch.searchsorted(edges, best, right=True)) - 1
            run = torch.arange(int(edges[at]), int(edges[at + 1]))
        run = run[~taken[run]]
        taken[run] = True
        order.extend(run.tolist())
    chosen = torch.tensor(order[:tokens], dtype=torch.long, device=scores.device) + head
    kept = torch.cat([torch.arange(head, device=scores.device), chosen, torch.arange(n - tail, n, device=scores.device)])
    return kept.sort().values


def read_compression(compression: Compression | None, continued: int) -> Compression | None:
    """The compression of the read of `continued` chosen tokens: the same tokens per layer as the
    whole prompt's budget (a ratio is of the prompt, not of what continued); None where they fit."""
    if compression is None:
        return None
    plan = compression.plan
    candidates = continued - compression.kept_whole  # the question's tokens before the window are kept beside the plan
    if plan.total >= candidates * plan.num_layers:
        return None
    return Compression(compression.method, BudgetPlan(plan.num_layers, candidates, plan.total), compression.profile, compression.question)


def skim_prefill(
    model,
    input_ids: torch.Tensor,
    compression: Compression | None,
    plan: SkimPlan,
    *,
    head: int,
    tail: int,
    filter_compression: Compression | None = None,
    starts: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reindex=None,
    on_layer: Callable[[int], None] | None = None,
) -> tuple[Prefill, SkimRead]:
    """Skim the prompt `(1, n)` whose last `tail` tokens are the question and first `head` its
    opening (both always read in full): the filter pass, then the chosen tokens through every layer.
    `starts` (sorted positions where sentences or lines begin) make the runs tokens are chosen in.

    With `chunk_size` the filter reads in chunks, `filter_compression` pruning its layers after
    each and the question probing each; with `reindex` (a `Reindexer` over the filter layers'
    rotary layout) the filter's kept keys are re-indexed before each chunk (past the model's
    positions), and the chosen tokens are read packed.
    """
    n = input_ids.shape[1]
    device = input_ids.device
    started = time.perf_counter()
    skim = Filter(plan, n, device)
    cache = new_cache(model)
    packed = reindex is not None or plan.positions == "packed"
    bounds = chunk_bounds(n, chunk_size, True, tail, reindex is not None)  # [0, n] without a chunk size
    probe = input_ids[:, n - tail :]
    compressor = None
    position = 0
    with torch.inference_mode():
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            announce_chunk(on_layer, index, len(bounds) - 1, start, stop, n)
            step_ids, probe_len = input_ids[:, start:stop], 0
            if stop < n:
                step_ids, probe_len = torch.cat([step_ids, probe], dim=1), tail
            if filter_compression is not None and len(bounds) > 2:
                compressor = filter_compression.compressor() if compressor is None else compressor.next_step()
            fed_at = start if reindex is None else position
            try:
                forward(model, cache, step_ids, fed_at, compressor, probe_len, on_layer,
                        original_start=None if reindex is None else start, skim=skim)
            except FilterDone:
                pass
            else:
                raise RuntimeError("internal: the skim's filter read every layer")
            skim.end_chunk()
            if reindex is not None:
                position = reindex.pack(_Filtered(cache, plan.stop_layer + 1))
    del cache
    filtered = time.perf_counter()
    chosen = choose_tokens(skim.best, head, tail, plan.tokens, plan.span, starts)
    m = chosen.shape[0]
    read = read_compression(compression, m)
    cache = new_cache(model)
    fed = torch.arange(m, device=device) if packed else chosen
    announce_chunk(on_layer, 0, 1, 0, n, n)
    compressor = read.compressor() if read is not None else None
    with torch.inference_mode():
        logits = forward(model, cache, input_ids[:, chosen], 0, compressor, on_layer=on_layer,
                         positions=fed, original=chosen if packed else None)
    done = time.perf_counter()
    state = Prefill(
        cache=cache, logits=logits, prompt_len=n, seconds=done - started, compression=compression, compressor=compressor,
        chunks=[(0, n)], compressed=compression is not None or m < n, next_position=m if packed else None,
    )
    report = SkimRead(
        filter_layers=plan.stop_layer + 1, num_layers=cache.num_layers, prompt_tokens=n, continued=m,
        filter_s=filtered - started, read_s=done - filtered, chunks=len(bounds) - 1,
        positions="packed" if packed else "original", chosen=chosen,
    )
    return state, report
