"""A document prefix read once, question-agnostic, that every question follows.

The prompt up to the question (the document and a generic instruction) is compressed once
(`--reuse`, `kvcli compress`), or loaded from a `.kvc` file; each question and the template's
closing are then fed after a copy of it. Cheaper for many questions, but the method chose what
to keep without knowing them. Two scorers rank the prefix's tokens (`--scorer`):

- `repeat` (the default): the most attention a token gets while the model repeats the document
  after the prefix (KVzip, `kvcli/repeat.py`); a second pass over the document, and the full prefix
  is held. On the ten-fact benchmark it keeps 2-5 of 10 facts at ratio 0.1 where the instruction
  keeps none, and 5-8 at 0.3 where it keeps 2-3;
- `instruction`: the attention of the instruction in the observation window (the default for
  methods that do not rank by attention scores, h2o and streamingllm, and for reads in chunks).

Both keep the instruction as the window, so the question follows it as it would in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..defaults import DEFAULT_SCORER
from ..errors import InputError
from ..generate import Capture, Prefill, capture, extend, prefill
from ..methods import REGISTRY, Budget, Method
from ..prompt import REUSE_INSTRUCTION, Prompt, question_suffix
from ..reindex import Reindexer
from ..repeat import REPEAT_CHUNK_SIZE, Repeated, first_cut, repeat_prefix
from .reader import Options, Reader, Reading

SCORERS = ("instruction", "repeat")
REPEAT_REQUEST = "Repeat the previous context exactly."
# Later chunks: the request names where the chunk starts (the previous chunk's last tokens).
REPEAT_RESUME = "Repeat the rest of the previous context exactly, from just after: {tail}"
_RESUME_TAIL = 8  # target tokens quoted in the resume request


def check_scorer(scorer: str, method: Method) -> None:
    """Refuse an unknown scorer, or the repeat scorer with a method that does not rank by scores."""
    if scorer not in SCORERS:
        raise InputError(f"unknown scorer {scorer!r}; choose {' or '.join(SCORERS)}")
    if scorer == "repeat" and method.compresses and not method.takes_key_scores:
        able = [name for name, cls in REGISTRY.items() if cls().compresses and cls().takes_key_scores]
        raise InputError(
            f"the repeat scorer ranks tokens by attention, and {method.name} keeps {method.summary}; "
            f"use {', '.join(able)}, or the instruction scorer"
        )


def pick_scorer(scorer: str | None, method: Method, chunk_size: int | None = None) -> str:
    """`--scorer` as given (checked), or the default: the repeat scorer where it applies, else the
    instruction (a method that does not rank by scores; a read in chunks, which never holds the
    full prefix the repeat scores)."""
    if scorer is None:
        fits = not method.compresses or method.takes_key_scores
        return DEFAULT_SCORER if fits and not chunk_size else "instruction"
    check_scorer(scorer, method)
    if scorer == "repeat" and chunk_size:
        raise InputError("--chunk-size never holds the full prefix, and the repeat scorer scores the full prefix; drop --chunk-size or use --scorer instruction")
    return scorer


@dataclass
class Prefix:
    """A compressed document prefix (the prompt up to the question) that questions follow."""

    state: Prefill  # its cache, length (`prompt_len`) and what making it cost (`seconds`)
    method: Method
    mode: str  # "reused" or "saved"
    note: str = ""
    window: str = ""
    prompt: Prompt | None = None  # None for a saved cache
    charged: bool = False  # whether a question has paid for making it yet
    extra: dict = field(default_factory=dict)  # for the report: the scorer, and the repeat's cost
    source_map: object | None = None  # a saved prefix's `sources.SourceMap` (--sources); None: its prompt maps

    def reading(self) -> Reading:
        """The prefix itself as a reading (what `compress` reports and saves)."""
        return Reading(self.state, self.method, self.mode, self.note, self.window, self.prompt, self._dropped)

    @property
    def _dropped(self) -> int:
        return self.prompt.dropped_tokens if self.prompt is not None else 0

    def ask(self, reader: Reader, question: str, options: Options) -> Reading:
        """Feed `question` after a copy of this prefix; only the first question pays for making it."""
        made = 0.0 if self.charged else self.state.seconds
        self.charged = True
        suffix = question_suffix(reader.tokenizer, question, REUSE_INSTRUCTION, options.system)
        with reader.prefilling():
            state = extend(reader.model, self.state, suffix.to(reader.device), seconds=made)
        return Reading(state, self.method, self.mode, self.note, self.window, self.prompt, self._dropped, charged_s=made)


QUESTION_ROOM = 128  # tokens kept free, in a prefix past the context, for a question asked after it


class Reused:
    """Compresses one document's prefix question-agnostically, ranked by `scorer` (`SCORERS`)."""

    name = "reuse"

    def __init__(self, reader: Reader, document: str, options: Options, scorer: str = DEFAULT_SCORER) -> None:
        if scorer not in SCORERS:
            raise InputError(f"unknown scorer {scorer!r}; choose {' or '.join(SCORERS)}")
        self.reader = reader
        self.options = options
        self.scorer = scorer
        self.prompt = reader.prompt(document, "?", options, instruction=REUSE_INSTRUCTION, whole=options.fit == "reindex")
        if options.fit == "reindex" and not self.past_window:
            self.prompt = reader.prompt(document, "?", options, instruction=REUSE_INSTRUCTION)  # fits: as ever

    @property
    def past_window(self) -> bool:
        """Whether the prefix, a question and the answer pass the positions the model reads."""
        return self.prompt.prefix_len + QUESTION_ROOM + self.options.max_new_tokens > self.reader.context_limit(self.options)

    @property
    def ids(self):
        return self.prompt.ids[:, : self.prompt.prefix_len].to(self.reader.device)

    def method_for(self, method: Method, agnostic: Method | None) -> Method:
        """What compresses this prefix: `agnostic` (the default of a question-agnostic cache, when
        the user named no method) where the repeat ranks it, else `method`. Past the positions the
        instruction probes each chunk (`read`), a read `method` was measured in and that keeps each
        layer within the positions; the agnostic default moves budget between layers freely."""
        return agnostic if agnostic is not None and self.scorer == "repeat" and not self.past_window else method

    def read(self, method: Method, budget: Budget | None = None, chunk_size: int | None = None,
             on_layer: Callable[[int], None] | None = None) -> Prefix:
        """Compress the prefix live. In chunks, the generic instruction probes every chunk, as
        it scores the last one, so no chunk is judged by its own last tokens. The repeat scorer
        reads the prefix whole, repeats it, and prunes that full cache (no chunks)."""
        check_scorer(self.scorer, method)
        if self.past_window:
            return self._read_past(method, budget or self.options.budget, chunk_size, on_layer)
        compression, note = self.reader.compression(method, budget or self.options.budget, self.prompt.prefix_len,
                                                     repeat=self.scorer == "repeat")
        chunk_size = chunk_size if chunk_size is not None else self.options.chunk_size
        if self.scorer == "repeat" and compression is not None:
            pick_scorer(self.scorer, method, chunk_size)  # refuses chunks
            repeated = self.repeat(on_layer, surprisal=bool(compression.method.surprisal))
            return self._prefix(repeated.derive(compression, copy=False), method, note, repeated)
        probe = self.prompt.ids[:, self.prompt.doc_end : self.prompt.prefix_len] if chunk_size and compression is not None else None
        with self.reader.prefilling():
            state = prefill(self.reader.model, self.ids, compression, chunk_size=chunk_size, probe_ids=probe, on_layer=on_layer)
        return self._prefix(state, method, note)

    def _read_past(self, method: Method, budget: Budget, chunk_size: int | None, on_layer) -> Prefix:
        """A prefix longer than the context: read in chunks with the instruction probing each, the
        kept keys re-indexed (the repeat scorer needs the whole prefix within the positions)."""
        reader = self.reader
        limit = reader.context_limit(self.options)
        n = self.prompt.prefix_len
        probe = self.prompt.ids[:, self.prompt.doc_end : n].to(reader.device)  # the generic instruction
        compression, note, chunk, layout = reader.plan_past(self.options, method, budget, n, QUESTION_ROOM + probe.shape[1], chunk_size)
        with reader.prefilling():
            state = prefill(reader.model, self.ids, compression, chunk_size=chunk, probe_ids=probe, on_layer=on_layer,
                            reindex=Reindexer(layout), tail=probe.shape[1])
        if self.scorer == "repeat":
            note = (note + "; " if note else "") + "scored by the instruction: the repeat scorer needs the whole document within the model's positions"
        prefix = self._prefix(state, compression.method if compression else method, note)
        prefix.extra = {**prefix.extra, "scorer": "instruction", "past_window": {"prompt_tokens": n, "positions": limit, "chunks": len(state.chunks), "chunk_size": chunk}}
        return prefix

    def capture(self, window_size: int, accumulated: bool = False, on_layer=None) -> Capture:
        with self.reader.prefilling():
            return capture(self.reader.model, self.ids, window_size, accumulated, on_layer)

    def repeat(self, on_layer=None, surprisal: bool | None = None) -> Repeated:
        """The prefix read full and scored by the model repeating the document after it; any
        method's prefix is derived from it (`derive`). `surprisal`: whether to measure each token's
        surprisal at once (True), never (False), or when a method first weighs by it (None:
        the prefill's hidden states are held until then; `repeat_prefix`)."""
        tokenizer, system = self.reader.tokenizer, self.options.system
        doc_begin = next((i for i, start in enumerate(self.prompt.token_starts) if start >= self.prompt.doc_start), self.prompt.doc_end)
        target = self.ids[:, doc_begin : self.prompt.doc_end]  # (1, t) the document's own tokens
        if target.shape[1] == 0:
            target = self.ids  # no document tokens (an empty document): repeat what there is

        def prompt_for(start: int) -> torch.Tensor:
            if start == 0:
                return question_suffix(tokenizer, REPEAT_REQUEST, None, system)
            tail = tokenizer.decode(target[0, max(0, start - _RESUME_TAIL) : start].tolist())
            return question_suffix(tokenizer, REPEAT_RESUME.format(tail=tail), None, system)

        # Chunks stay within the model's positions where the prefix leaves room (64: the request).
        room = self.reader.max_positions - self.prompt.prefix_len - 64
        chunk_size = max(256, min(REPEAT_CHUNK_SIZE, room))
        with self.reader.prefilling():
            return repeat_prefix(self.reader.model, self.ids, target.to(self.reader.device), prompt_for, chunk_size, on_layer,
                                 surprisal)

    def derive(self, captured: Capture | Repeated, method: Method, budget: Budget | None = None) -> Prefix:
        """The prefix `method` keeps from a capture (the instruction scorer) or a repeat (`repeat`)."""
        repeated = captured if isinstance(captured, Repeated) else None
        if repeated is not None:
            check_scorer("repeat", method)
        compression, note = self.reader.compression(method, budget or self.options.budget, self.prompt.prefix_len,
                                                     repeat=repeated is not None)
        return self._prefix(captured.derive(compression), method, note, repeated)

    def _prefix(self, state: Prefill, method: Method, note: str, repeated: Repeated | None = None) -> Prefix:
        window = self.reader.tokenizer.decode(self.ids[0, -method.window_size :]) if state.compressed else ""
        extra = {"scorer": "repeat" if repeated is not None else "instruction"} if state.compressed else {}
        if repeated is not None and state.compressed:
            extra.update(repeat_s=round(repeated.repeat_s, 3), repeat_x_prefill=round(repeated.repeat_s / max(repeated.state.seconds, 1e-9), 2))
            if state.compression is not None and first_cut(state.compression) is not None:
                # the second over a cut of rescore x the budget (repeat.first_cut); its time, with the cuts', is the derive's
                extra.update(repeats=2, rescore=method.rescore, rescore_s=round(max(0.0, state.seconds - repeated.seconds), 3))
            if state.compression is not None and state.compression.method.surprisal:
                # the scores were weighed (repeat.weigh); measuring each token's surprisal took surprisal_s, within repeat_s
                extra.update(surprisal=state.compression.method.surprisal, surprisal_s=round(repeated.surprisal_s, 3))
        return Prefix(state, method, "reused", note, window, self.prompt, extra=extra)


def saved_prefix(reader: Reader, saved, method: Method) -> Prefix:
    """A `store.SavedCache` as a prefix to answer after."""
    meta = saved.meta
    compressed = bool(meta.get("compressed", not meta.get("note")))
    state = Prefill(cache=saved.cache, logits=None, prompt_len=saved.prompt_tokens, seconds=0.0, compressed=compressed,
                    next_position=meta.get("next_position"))
    from .cite import saved_source_map

    return Prefix(state, method, "saved", meta.get("note", ""), meta.get("window_text", ""), source_map=saved_source_map(saved))
