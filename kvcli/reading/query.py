"""Query-aware reading: the question sits in the observation window, as in the papers.

One prefill per question. With `--chunk-size` the prompt is read in chunks, compressing
after each, and the question is fed after every chunk as a probe (scoring it, not kept), so
the cache never holds more than the budget plus one chunk.
"""

from __future__ import annotations

from collections.abc import Callable

from ..generate import Capture, capture, prefill, prefill_bounds
from ..reindex import Reindexer
from ..methods import Budget, Method
from ..prompt import Prompt, window_text
from .reader import Options, Reader, Reading


class QueryAware:
    """Reads one document for each question it is asked."""

    name = "query"

    def __init__(self, reader: Reader, document: str, options: Options) -> None:
        self.reader = reader
        self.document = document
        self.options = options
        self._prompts: dict[str, Prompt] = {}

    def prompt(self, question: str) -> Prompt:
        """The prompt for `question`: whole when it will be read past the context, else cut to fit."""
        if question not in self._prompts:
            whole = self.options.fit == "reindex"
            prompt = self.reader.prompt(self.document, question, self.options, whole=whole)
            if whole and not self._past(prompt):
                prompt = self.reader.prompt(self.document, question, self.options)  # fits: the same prompt as ever
            self._prompts = {question: prompt}
        return self._prompts[question]

    def _past(self, prompt: Prompt) -> bool:
        return len(prompt) + self.options.max_new_tokens > self.reader.context_limit(self.options)

    def past_window(self, question: str) -> bool:
        """Whether the prompt for `question` is read past the context (chunks, re-indexed positions)."""
        return self._past(self.prompt(question))

    def read(self, question: str, method: Method, budget: Budget | None = None, chunk_size: int | None = None,
             on_layer: Callable[[int], None] | None = None) -> Reading:
        """Prefill the prompt for `question`, compressing live (in chunks if a chunk size is set;
        in chunks with re-indexed positions when the prompt is longer than the context)."""
        reader = self.reader
        prompt = self.prompt(question)
        if self._past(prompt):
            return self._read_past(prompt, method, budget or self.options.budget, chunk_size, on_layer)
        compression, note = reader.compression(method, budget or self.options.budget, len(prompt), prompt.question_len)
        chunk_size = self._chunks(prompt, compression, chunk_size)
        probe = prompt.ids[:, prompt.prefix_len :] if chunk_size and compression is not None else None
        with reader.prefilling():
            state = prefill(
                reader.model, prompt.ids.to(reader.device), compression,
                chunk_size=chunk_size, probe_ids=probe, on_layer=on_layer,
            )
        mode = "chunked" if len(state.chunks) > 1 else "query"
        return self._reading(prompt, state, method, mode, note)

    def live_chunks(self, question: str, method: Method, budget: Budget | None = None, chunk_size: int | None = None) -> int | None:
        """The chunk size `read` reads the prompt for `question` in (None: one pass); past the
        context, the positions themselves (a read in chunks whatever is asked)."""
        prompt = self.prompt(question)
        if self._past(prompt):
            return self.reader.context_limit(self.options)
        compression, _ = self.reader.compression(method, budget or self.options.budget, len(prompt), prompt.question_len)
        chunk = self._chunks(prompt, compression, chunk_size)
        if not chunk or compression is None:
            return None
        # the question stays in the last chunk: a chunk size the prompt before it fits in is one pass
        return chunk if len(prefill_bounds(len(prompt), chunk, compression)) > 2 else None

    def _chunks(self, prompt: Prompt, compression, chunk_size: int | None) -> int | None:
        chunk_size = chunk_size if chunk_size is not None else self.options.chunk_size
        if chunk_size is None and compression is not None:  # a long prompt in chunks where the method needs them for its peak (evidencekv)
            chunk_size = compression.method.prefill_chunk(compression.plan, compression.profile, prompt.question_len)
        return chunk_size

    def check(self, question: str, method: Method, budget: Budget | None = None) -> None:
        """Refuse, before any reading, what cannot be read: past the context, a method that keeps
        every token, a RoPE that cannot move, or a budget leaving no room for a chunk."""
        prompt = self.prompt(question)
        if self._past(prompt):
            self.reader.plan_past(self.options, method, budget or self.options.budget, len(prompt), prompt.question_len, question=prompt.question_len)

    def _read_past(self, prompt: Prompt, method: Method, budget: Budget, chunk_size: int | None, on_layer) -> Reading:
        """Read a prompt longer than the context: in chunks, compressing after each, the question
        probing every chunk, kept keys re-indexed so that no position reaches the context's end."""
        reader = self.reader
        question = prompt.ids[:, prompt.prefix_len :]
        compression, note, chunk, layout = reader.plan_past(self.options, method, budget, len(prompt), question.shape[1], chunk_size, question=question.shape[1])
        n, limit = len(prompt), reader.context_limit(self.options)
        with reader.prefilling():
            state = prefill(
                reader.model, prompt.ids.to(reader.device), compression, chunk_size=chunk,
                probe_ids=question.to(reader.device), on_layer=on_layer, reindex=Reindexer(layout), tail=question.shape[1],
            )
        reading = self._reading(prompt, state, compression.method if compression else method, "reindexed", note)
        reading.past = {"prompt_tokens": n, "positions": limit, "chunks": len(state.chunks), "chunk_size": chunk}
        return reading

    def capture(self, question: str, window_size: int, accumulated: bool = False, on_layer=None) -> Capture:
        """One full prefill from which any method's query-aware cache is derived (eval, --compare)."""
        with self.reader.prefilling():
            return capture(self.reader.model, self.prompt(question).ids.to(self.reader.device), window_size, accumulated, on_layer)

    def derive(self, captured: Capture, question: str, method: Method, budget: Budget | None = None) -> Reading:
        """The cache a live `read` would keep, replayed from `captured` (the same cache, tested)."""
        prompt = self.prompt(question)
        compression, note = self.reader.compression(method, budget or self.options.budget, len(prompt), prompt.question_len)
        return self._reading(prompt, captured.derive(compression), method, "query", note)

    def _reading(self, prompt: Prompt, state, method: Method, mode: str, note: str) -> Reading:
        window = window_text(self.reader.tokenizer, prompt, method.window_size) if state.compressed else ""
        return Reading(state, method, mode, note, window, prompt, prompt.dropped_tokens)
