"""A document prefix read once, question-agnostic, that every question follows.

The prompt up to the question (the document and a generic instruction) is compressed once
with the instruction in the observation window (`--reuse`, `kvcli compress`), or loaded
from a `.kvc` file; each question and the template's closing are then fed after a copy of
it. Cheaper for many questions, but the method chose what to keep without knowing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..generate import Capture, Prefill, capture, extend, prefill
from ..methods import Budget, Method
from ..prompt import REUSE_INSTRUCTION, Prompt, question_suffix
from .reader import Options, Reader, Reading


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
        state = extend(reader.model, self.state, suffix.to(reader.device), seconds=made)
        return Reading(state, self.method, self.mode, self.note, self.window, self.prompt, self._dropped)


class Reused:
    """Compresses one document's prefix question-agnostically."""

    name = "reuse"

    def __init__(self, reader: Reader, document: str, options: Options) -> None:
        self.reader = reader
        self.options = options
        self.prompt = reader.prompt(document, "?", options, instruction=REUSE_INSTRUCTION)

    @property
    def ids(self):
        return self.prompt.ids[:, : self.prompt.prefix_len].to(self.reader.device)

    def read(self, method: Method, budget: Budget | None = None, chunk_size: int | None = None,
             on_layer: Callable[[int], None] | None = None) -> Prefix:
        """Compress the prefix live. In chunks, the generic instruction probes every chunk, as
        it scores the last one, so no chunk is judged by its own last tokens."""
        compression, note = self.reader.compression(method, budget or self.options.budget, self.prompt.prefix_len)
        chunk_size = chunk_size if chunk_size is not None else self.options.chunk_size
        probe = self.prompt.ids[:, self.prompt.doc_end : self.prompt.prefix_len] if chunk_size and compression is not None else None
        state = prefill(self.reader.model, self.ids, compression, chunk_size=chunk_size, probe_ids=probe, on_layer=on_layer)
        return self._prefix(state, method, note)

    def capture(self, window_size: int, accumulated: bool = False, on_layer=None) -> Capture:
        return capture(self.reader.model, self.ids, window_size, accumulated, on_layer)

    def derive(self, captured: Capture, method: Method, budget: Budget | None = None) -> Prefix:
        compression, note = self.reader.compression(method, budget or self.options.budget, self.prompt.prefix_len)
        return self._prefix(captured.derive(compression), method, note)

    def _prefix(self, state: Prefill, method: Method, note: str) -> Prefix:
        window = self.reader.tokenizer.decode(self.ids[0, -method.window_size :]) if state.compressed else ""
        return Prefix(state, method, "reused", note, window, self.prompt)


def saved_prefix(reader: Reader, saved, method: Method) -> Prefix:
    """A `store.SavedCache` as a prefix to answer after."""
    meta = saved.meta
    compressed = bool(meta.get("compressed", not meta.get("note")))
    state = Prefill(cache=saved.cache, logits=None, prompt_len=saved.prompt_tokens, seconds=0.0, compressed=compressed)
    return Prefix(state, method, "saved", meta.get("note", ""), meta.get("window_text", ""))
