"""Skim reading (`--skim`): the documents through the first layers, what the question needs through all.

The filter heads are the model's own retrieval heads (`kvcli/profile.py`), taken no deeper than
the skim's depth; the engine (`kvcli/skim.py`) reads the prompt through the layers up to the
deepest of them, scores every token by the question's attention there, and reads the chosen
tokens through the whole model. Within the positions the chosen tokens keep their own positions;
past them the filter reads in chunks, re-indexed as `QueryAware` reads, and the chosen tokens are
read packed. The defaults (docs/methods.md#skim---skim-reading-less) come from
benchmarks/skim_filter.py, skim_answers.py and skim_speed.py (docs/results.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..defaults import DEFAULT_SKIM_TOKENS
from ..errors import InputError
from ..methods import Budget, Compression, Method, SnapKV
from ..prompt import Prompt
from ..reindex import Reindexer
from ..skim import SINK_TOKENS, SkimPlan, skim_prefill
from .query import QueryAware
from .reader import Options, Reader, Reading

# The filter's depth as a fraction of the layers; None: from the profile (AUTO_SCORE below).
DEFAULT_SKIM_DEPTH = None
# "auto" depth: the shallowest layer with a head whose profile score (-log2(rank + 1), the rank the
# head gives the fact among 1.2-2.4K tokens) is at least this: a rank within the top 15.
AUTO_SCORE = -4.0
FILTER_HEADS = 8
# The filter reads prompts longer than this in chunks of this many tokens (the question probing each).
FILTER_CHUNK = 8192
POSITIONS = ("original", "packed")


@dataclass(frozen=True)
class Skimming:
    """`--skim` and its knobs, checked once."""

    tokens: int = DEFAULT_SKIM_TOKENS  # document tokens that continue through every layer
    depth: float | None = DEFAULT_SKIM_DEPTH  # deepest filter layer as a fraction of the layers; None: from the profile
    heads: int = FILTER_HEADS
    positions: str = "original"
    span: int = 0  # runs tokens are chosen in: 0, the sentence or line of each chosen token; N, the N tokens centred on it

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise InputError(f"--skim-tokens must be at least 1, got {self.tokens}")
        if self.depth is not None and not 0 < self.depth <= 1:
            raise InputError(f"--skim-depth must be in (0, 1], got {self.depth}")
        if self.heads < 1:
            raise InputError(f"the skim's filter needs at least one head, got {self.heads}")
        if self.span < 0:
            raise InputError(f"skim runs must be 0 (sentences) or a number of tokens, got {self.span}")
        if self.positions not in POSITIONS:
            raise InputError(f"skim positions must be {' or '.join(POSITIONS)}, got {self.positions!r}")


def filter_heads(profile, compressed_layers: list[int], skimming: Skimming) -> tuple[tuple[int, int], ...]:
    """(model layer, query head) pairs that filter: the profile's best `heads` among the layers up to
    the skim's depth. The profile ranks the layers a method compresses (a sliding-window model's
    global layers), so its rows are mapped back to the model's layers."""
    rows = len(profile.scores)
    if skimming.depth is None:  # no head that good: the layer of the best head there is
        best = max(range(rows), key=lambda r: max(profile.scores[r]))
        deepest = next((r for r, row in enumerate(profile.scores) if max(row) >= AUTO_SCORE), best)
    else:
        deepest = max(0, math.floor(skimming.depth * (rows - 1)))
    pairs = profile.top_heads(skimming.heads, max_layer=deepest)
    return tuple((compressed_layers[row], head) for row, head in pairs)


def skim_work(profile, compressed_layers: list[int], num_layers: int, skimming: Skimming, prompt_tokens: int,
              document_tokens: int) -> dict:
    """The prefill's work with and without a skim, in tokens x layers (the attention's growth with
    length aside): a one-pass read puts every token through every layer; a skim puts them through
    the filter's layers, then the prompt outside the documents and `tokens` of them through all."""
    filter_layers = max(layer for layer, _ in filter_heads(profile, compressed_layers, skimming)) + 1
    continued = min(prompt_tokens, prompt_tokens - document_tokens + skimming.tokens)
    full = prompt_tokens * num_layers
    work = prompt_tokens * filter_layers + continued * num_layers
    return {"filter_layers": filter_layers, "layers": num_layers, "continued_tokens": continued,
            "work": work, "full_work": full, "share": round(work / full, 4)}


class Skim:
    """Reads one document for each question, skimming: the mode `choose` picks for `--skim`."""

    name = "skim"

    def __init__(self, reader: Reader, query: QueryAware, skimming: Skimming) -> None:
        self.reader, self.query, self.skimming = reader, query, skimming
        self._plan: SkimPlan | None = None

    @property
    def options(self) -> Options:
        return self.query.options

    def plan(self) -> SkimPlan:
        """The filter heads and how many tokens continue (the profile is loaded, or computed once)."""
        if self._plan is None:
            heads = filter_heads(self.reader.profile(), self.reader.attention.compressed_layers, self.skimming)
            self._plan = SkimPlan(heads=heads, tokens=self.skimming.tokens, positions=self.skimming.positions, span=self.skimming.span or 16)
        return self._plan

    def prompt(self, question: str) -> Prompt:
        return self.query.prompt(question)

    def check(self, question: str, method: Method, budget: Budget | None = None) -> None:
        self.query.check(question, method, budget)
        if self.reader.attention.cannot_compress():
            raise InputError(f"--skim cannot read this model: {self.reader.attention.cannot_compress()}; drop --skim")

    def fraction(self, question: str) -> float:
        """The share of a one-pass read's layer work a skim of the prompt for `question` costs."""
        prompt, plan = self.prompt(question), self.plan()
        n, layers = len(prompt), self.reader.num_layers
        return (plan.stop_layer + 1) / layers + min(n, self._continued(prompt)) / n

    def _continued(self, prompt: Prompt) -> int:
        """Tokens a skim of `prompt` reads through every layer: its opening (at least the sinks),
        --skim-tokens of the documents and the question (more than the prompt where it is short)."""
        return max(_head(prompt), SINK_TOKENS) + self.skimming.tokens + prompt.question_len

    def read(self, question: str, method: Method, budget: Budget | None = None, on_layer=None) -> Reading:
        reader, options = self.reader, self.options
        prompt = self.prompt(question)
        budget = budget or options.budget
        n, tail, head = len(prompt), prompt.question_len, _head(prompt)
        plan = self.plan()
        past = self.query.past_window(question)
        skipped = ""
        if not past and self._continued(prompt) >= n:
            skipped = f"the {n:,}-token prompt is no longer than --skim-tokens {plan.tokens:,} with its question"
        elif not past and self.fraction(question) >= 1:
            skipped = (f"the filter reads {plan.stop_layer + 1} of {reader.num_layers} layers, so a skim would cost "
                       f"more than reading every token (a shallower --skim-depth, or fewer --skim-tokens)")
        if skipped:  # the filter would only add its own layers' work
            reading = self.query.read(question, method, budget, on_layer=on_layer)
            reading.skim = {"skipped": skipped}
            return reading
        note, reindex, chunk, filtering = "", None, None, None
        if past:
            compression, note, chunk, layout = reader.plan_past(options, method, budget, n, tail, question=tail)
            limit = reader.context_limit(options)
            room = limit - options.max_new_tokens - max(head, SINK_TOKENS) - tail
            if plan.tokens > room:  # read packed, the chosen tokens and the answer stay within the positions
                plan = replace(plan, tokens=max(0, room))
            reindex = Reindexer(layout[: plan.stop_layer + 1])
        else:
            compression, note = reader.compression(method, budget, n, tail)
            chunk = options.chunk_size if compression is not None else None
            if chunk is None and n > FILTER_CHUNK:
                # a long prompt in chunks (its filter layers' KV kept whole): one pass would hold every
                # token's activations at once, 1.9 GB more than the one-pass read's peak at 32K tokens
                chunk = FILTER_CHUNK
        if compression is not None and (options.chunk_size is not None or reindex is not None):
            # the filter's own layers, compressed after each chunk to the same tokens per layer
            filtering = Compression(SnapKV(window_size=compression.method.window_size), compression.plan)
        with reader.prefilling():
            state, skim = skim_prefill(
                reader.model, prompt.ids.to(reader.device), compression, plan, head=head, tail=tail,
                filter_compression=filtering, starts=run_starts(prompt) if self.skimming.span == 0 else None, chunk_size=chunk, reindex=reindex, on_layer=on_layer,
            )
        reading = self.query._reading(prompt, state, compression.method if compression is not None else method, "skim", note)
        reading.skim = skim.to_dict()
        reading.skim["filter_heads"] = [list(pair) for pair in plan.heads]
        if reindex is not None:
            reading.past = {"prompt_tokens": n, "positions": reader.context_limit(options), "chunks": skim.chunks, "chunk_size": chunk}
        return reading


# A run of the documents that goes on whole is a sentence or a line, cut every this many tokens.
LONGEST_RUN = 48


def run_starts(prompt: Prompt, longest: int = LONGEST_RUN) -> torch.Tensor:
    """Positions `(k,)` where a run of the prompt begins: a token right after a line break or a
    sentence's end (., ?, !), and at the latest `longest` tokens after the last start."""
    text, starts = prompt.text, prompt.token_starts
    found, last = [], 0
    for p in range(1, len(starts)):
        before = text[starts[p] - 1] if starts[p] > 0 else "\n"
        after_line = before == "\n"
        after_stop = before in ".?!" and text[starts[p] : starts[p] + 1] in (" ", "\n")  # "." then " The"
        after_space = before in " \t" and text[starts[p] - 2 : starts[p] - 1] in (".", "?", "!")  # ". " then "The"
        if after_line or after_stop or after_space or p - last >= longest:
            found.append(p)
            last = p
    return torch.tensor(found, dtype=torch.long)


def _head(prompt: Prompt) -> int:
    """Tokens before the documents (the system prompt and the chat template's opening), always read."""
    return next((i for i, start in enumerate(prompt.token_starts) if start >= prompt.doc_start), len(prompt))
