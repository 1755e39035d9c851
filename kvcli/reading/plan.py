"""How a model will read documents, planned before its weights load (`kvcli plan`).

The prompt, the answer's room, the budget and the chunks come from the code a real read runs
(`Layout`, which `Reader` is, and `QueryAware.prompt`), on the model's config and tokenizer
alone; the KV bytes from the config (layers, KV heads, head_dim, which layers slide) and the
compute dtype. Nothing here loads weights or prints.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass

import torch

from ..errors import KvcliError
from ..methods import BudgetPlan, Method, question_kept_whole
from .layout import Layout, prefill_steps
from .query import QueryAware

PLACEHOLDER_QUESTION = "What does the document say?"  # planned when no question is given


@dataclass
class SourceTokens:
    """The tokens of one file or PDF page of the documents."""

    label: str  # 'report.pdf p.3', 'src/app.py'
    tokens: int


@dataclass
class Sliding:
    """The model's sliding-window layers, as `Layout.attention` predicts them from the config (the
    loaded model's probe decides): never compressed, each holds its window less the newest token."""

    layers: int
    windows: list[int]  # the window sizes, each once
    kv_held: int  # bytes those layers hold after the prefill


@dataclass(frozen=True)
class KVBytes:
    """What tokens cost in the KV cache, from the config: keys and values are stored once per KV
    head (grouped-query models are never expanded), in the compute dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> KVBytes:
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            dtype_bytes=torch.finfo(dtype).bits // 8,
        )

    @property
    def entry(self) -> int:
        """Bytes of one token's keys and values in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def every_layer(self, tokens_per_layer: float) -> int:
        """Bytes of `tokens_per_layer` tokens (a mean, perhaps fractional) in every layer."""
        return int(math.ceil(self.entry * self.num_layers * tokens_per_layer))


@dataclass
class ReadPlan:
    """What reading the documents with one question will do, and what its cache will weigh."""

    sources: list[SourceTokens]
    document_tokens: int
    prompt_tokens: int  # the chat prompt: template, documents (after any cut) and question
    question_tokens: int  # the question and the template's closing: fed after every chunk
    answer_tokens: int  # room reserved for the answer (--max-new-tokens)
    positions: int  # the positions the model reads (--max-context, else its own)
    trained_positions: int  # the model's max_position_embeddings
    mode: str  # "query" (one pass), "chunked" (--chunk-size) or "reindexed" (past the positions)
    chunks: int  # forward passes over the prompt; 0 when refused
    chunk_size: int | None  # tokens per chunk, None for one pass
    dropped_tokens: int  # cut from the middle (--cut-middle)
    budget: BudgetPlan | None  # None: the full cache is kept
    budget_note: str  # why the cache is not compressed as asked, or ""
    most_kept: int | None  # the most tokens one layer may keep (the question's included)
    question_kept: int  # per compressed layer, beside the budget: the question's tokens before the window (the window's are in `budget`)
    method_params: dict  # the knobs the read runs with (past the context a method may hold less than asked)
    refused: str  # the one-line error a read would stop with, or ""
    dtype: str
    bytes_per_token: int  # keys and values of one token in every layer
    kv_full: int  # the prompt's full cache
    kv_kept: int | None  # the cache kept after the prefill
    kv_peak: int | None  # the cache at its largest: the prefill's (below), or kept plus the answer's tokens
    kv_prefill: int | None  # during the prefill: every layer whole for one pass; in chunks, every layer at its most kept plus one chunk and the question
    compressed_layers: int  # the layers a method compresses (the global ones), over which the budget is spread
    sliding: Sliding | None

    @property
    def past(self) -> bool:
        return self.mode == "reindexed"

    @property
    def tokens_per_layer(self) -> float | None:
        """What each compressed layer keeps: the document's budget and the whole question beside it."""
        return None if self.budget is None else self.budget.average + self.question_kept

    @property
    def kept_ratio(self) -> float | None:
        """`tokens_per_layer` as a share of the prompt, as the read's report gives it."""
        return None if self.budget is None else self.tokens_per_layer / self.prompt_tokens

    def to_dict(self) -> dict:
        data = asdict(self)
        data["budget"] = None if self.budget is None else {
            "total": self.budget.total + self.question_kept * self.budget.num_layers,
            "tokens_per_layer": self.tokens_per_layer, "ratio": self.kept_ratio,
        }
        return data


def make_plan(layout: Layout, doc, question: str, options, method: Method, dtype, profile=None) -> ReadPlan:
    """Plan a query-aware read of `doc` (an `ingest.Document`) for `question`, as `QueryAware.read`
    would do it under `options` (a checked `reading.Options`) and `method`; `dtype` is the KV's.
    `profile` is the model's retrieval-head profile where one is stored: a method that reads long
    prompts in chunks by it (evidencekv) is planned so; without it such a read is planned in one pass
    and the note says the real read may chunk (its peak is then lower than planned)."""
    sources, document_tokens = source_tokens(layout.tokenizer, doc)
    query = QueryAware(layout, doc.text, options)
    prompt = query.prompt(question)
    n, tail = len(prompt), prompt.question_len
    whole = question_kept_whole(tail, method.window_size) if method.compresses else 0  # the question kept beside the budget (Compression)
    budget, note, chunk, refused = None, "", None, ""
    if query.past_window(question):
        mode = "reindexed"
        try:
            budget, note, chunk, _, method = layout.past_chunking(options, method, options.budget, n, tail, question=tail)
            chunks = prefill_steps(n, chunk, True, tail=tail, reindexed=True)
        except KvcliError as err:
            refused, chunks = str(err), 0
    else:
        budget, note = layout.budget_plan(method, options.budget, n, tail)
        chunk = options.chunk_size
        if chunk is None and budget is not None and method.needs_profile:  # what QueryAware.read picks
            if profile is not None:
                chunk = method.prefill_chunk(budget, profile, tail)
            elif method.chunks_from_tokens is not None and n >= method.chunks_from_tokens:
                note = (note + "; " if note else "") + (
                    f"{method.name} may read this prompt in chunks (by the model's retrieval-head profile, computed on the "
                    "first read): the prefill peak below assumes one pass, an upper bound")
        chunks = prefill_steps(n, chunk, budget is not None, tail=tail)  # the question in the last chunk, whole
        mode = "chunked" if chunks > 1 else "query"
        chunk = chunk if chunks > 1 else None

    kv = KVBytes.of(layout.config, dtype)
    attention = layout.attention  # which layers slide, predicted from the config
    windows = [w for w in attention.windows if w is not None]
    held = sum(min(n, w - 1) for w in windows)  # what the sliding-window layers hold, compressed or not
    num_global = len(attention.compressed_layers)
    full = kv.entry * (num_global * n + held)
    kept = peak = prefill = None
    if not refused:
        kept = full if budget is None else kv.entry * (budget.total + whole * num_global + held)
        # One pass: every layer whole bounds it (evidencekv holds most layers whole until its evidence
        # heads are seen). In chunks: each layer holds at most what one layer may keep, one chunk and
        # the question probing it (dynamickv holds a layer's candidates until it re-divides).
        most = 0 if budget is None else max(method.most_kept(budget), attention.most_in_window)
        prefill = kv.every_layer(n) if chunks == 1 else kv.every_layer(most + chunk + tail)
        peak = max(prefill, kept + kv.entry * num_global * options.max_new_tokens)  # sliding layers do not grow
    return ReadPlan(
        sources=sources, document_tokens=document_tokens, prompt_tokens=n, question_tokens=tail,
        answer_tokens=options.max_new_tokens, positions=layout.context_limit(options), trained_positions=layout.max_positions,
        mode=mode, chunks=chunks, chunk_size=chunk, dropped_tokens=prompt.dropped_tokens, budget=budget, budget_note=note,
        most_kept=None if budget is None else method.most_kept(budget) + whole, question_kept=whole if budget is not None else 0,
        method_params=method.params(), refused=refused,
        dtype=str(dtype).removeprefix("torch."), bytes_per_token=kv.every_layer(1), kv_full=full, kv_kept=kept,
        kv_peak=peak, kv_prefill=prefill, compressed_layers=num_global,
        sliding=Sliding(len(windows), sorted(set(windows)), kv.entry * held) if windows else None,
    )


def source_tokens(tokenizer, doc) -> tuple[list[SourceTokens], int]:
    """(tokens per source, tokens of the whole text) as the prompt tokenizes the documents: in one
    pass, each token counted in the source where it starts (a separator's in the source before it)."""
    try:
        encoded = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer has no offsets: each source alone
        counts = [len(tokenizer(doc.text[s.start : s.end], add_special_tokens=False)["input_ids"]) for s in doc.sources]
        total = len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        return [SourceTokens(doc.label(s), c) for s, c in zip(doc.sources, counts)], total
    edges = [s.start for s in doc.sources]
    counts = [0] * len(doc.sources)
    for start in starts:
        counts[max(0, bisect.bisect_right(edges, start) - 1)] += 1
    return [SourceTokens(doc.label(s), c) for s, c in zip(doc.sources, counts)], len(starts)


__all__ = ["PLACEHOLDER_QUESTION", "KVBytes", "ReadPlan", "Sliding", "SourceTokens", "make_plan", "source_tokens"]
