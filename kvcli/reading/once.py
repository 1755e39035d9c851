"""Read once, compress per question: the document is prefilled once with the full cache, and
each question is fed after it and compressed exactly as a one-pass query-aware read would be.

The prefix is the prompt up to the question (template opening and documents): its ids are the
same for every question, since a prompt is encoded as prefix and question separately, so no
token merges across the seam. Each question is fed as one multi-token step over a fork of the
full prefix; every layer is compressed right after that step's attention, scored by the
step's window queries, which see the same keys as in one pass. The answer decodes from that
compressed fork while the full prefix stays as it was for the next question.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InputError
from ..generate import FullPrefix, Prefill, ask_after, read_prefix
from ..methods import Budget, Method
from ..prompt import Prompt, question_suffix
from .reader import Options, Reader, Reading


# The widest observation window a question after a prefix read once may use: the same for every
# command, so that a prefix chat saves (/save) serves what one `kvcli read` saves does.
PREFIX_WINDOW = 64


class ReadOnce:
    """Holds one document's full prefix and answers each question from a compressed fork of it."""

    name = "once"

    def __init__(self, reader: Reader, document: str | None, options: Options, window_size: int = 32,
                 accumulated: bool = False, longest_question: str = "?") -> None:
        self.reader = reader
        self.options = options
        self.document = document  # None for a prefix loaded from a file
        self.longest_question = longest_question  # a cut document leaves room for it and the answer
        self.window_size = window_size  # the widest observation window a question may be scored with
        self.accumulated = accumulated  # record the prefix's all-query attention (for H2O)
        self.prefix: FullPrefix | None = None
        self.prompt: Prompt | None = None  # the prompt the prefix was cut from (None for a saved prefix)
        self.tail_ids: list[int] = []  # the prefix's last token ids, for the report's window text
        self.charged = False
        self.source_map = None  # a saved prefix's `sources.SourceMap`, for --sources (None: none saved)

    @classmethod
    def saved(cls, reader: Reader, saved, options: Options) -> ReadOnce:
        """A full prefix loaded from a `.kvc` of kind `full` (`store.SavedCache`)."""
        queries = saved.extras["tail_queries"]
        once = cls(reader, None, options, window_size=queries[0].shape[2], accumulated="accumulated" in saved.extras)
        state = Prefill(cache=saved.cache, logits=None, prompt_len=saved.prompt_tokens, seconds=0.0)
        once.prefix = FullPrefix(state, queries, saved.extras.get("accumulated"))
        once.tail_ids = list(saved.meta.get("tail_ids", []))  # for the report's window text
        once.charged = True
        from .cite import saved_source_map

        once.source_map = saved_source_map(saved)
        return once

    def layout(self) -> Prompt:
        """The prompt the prefix comes from: the document, cut in the middle if it must be so that
        the longest question and the answer fit after it."""
        if self.prompt is None:
            self.prompt = self.reader.prompt(self.document, self.longest_question, self.options)
        return self.prompt

    def read_prefix(self, on_layer: Callable[[int], None] | None = None) -> FullPrefix:
        """Prefill the prefix with the full cache (once; later calls return it)."""
        if self.prefix is None:
            prompt = self.layout()
            ids = prompt.ids[:, : prompt.prefix_len].to(self.reader.device)
            with self.reader.prefilling():
                self.prefix = read_prefix(self.reader.model, ids, self.window_size, self.accumulated, on_layer)
            self.tail_ids = ids[0, -self.window_size :].tolist()
        return self.prefix

    def can_answer(self, method: Method) -> bool:
        """Whether the prefix was read with what `method` scores by (its window, all-query attention)."""
        return method.window_size <= self.window_size and (self.accumulated or not method.needs_accumulated)

    def read(self, question: str, method: Method, budget: Budget | None = None,
             on_layer: Callable[[int], None] | None = None) -> Reading:
        """The cache a one-pass read of (document, question) keeps, made from the prefix.

        A prompt is encoded as its prefix and its question separately, so prefix ids + this
        question's ids are exactly the one-pass prompt's (when the document fits uncut).
        """
        prefix = self.read_prefix()
        n = prefix.state.prompt_len
        suffix = question_suffix(self.reader.tokenizer, question, None, self.options.system)
        limit = self.reader.context_limit(self.options)
        if n + suffix.shape[1] + self.options.max_new_tokens > limit:
            raise InputError(
                f"the document's prefix ({n} tokens), this question ({suffix.shape[1]}) and --max-new-tokens "
                f"{self.options.max_new_tokens} pass the {limit}-token context; ask a shorter question or lower --max-new-tokens"
            )
        if method.compresses and not self.can_answer(method):
            raise InputError(
                f"this prefix was read for observation windows up to {self.window_size} tokens"
                + ("" if self.accumulated else " and without all-query scores")
                + f"; {method.name} with --window {method.window_size} needs it read again"
                + ("" if not method.needs_accumulated else " (kvcli read --all-query-scores)")
            )
        compression, note = self.reader.compression(method, budget or self.options.budget, n + suffix.shape[1], suffix.shape[1])
        with self.reader.prefilling():
            state = ask_after(self.reader.model, prefix, suffix.to(self.reader.device), compression, on_layer)
        # the full prefix stays held while the question's fork is read: its bytes are part of this read's peak
        full = prefix.state.cache
        state.cache.peak_nbytes = max(full.kv_peak_nbytes, full.nbytes() + state.cache.kv_peak_nbytes)
        tail = (self.tail_ids + suffix[0].tolist())[-method.window_size :]
        window = self.reader.tokenizer.decode(tail) if state.compressed else ""
        made = {"tokens": n, "kv_bytes": prefix.state.cache.nbytes(), "seconds": 0.0 if self.charged else prefix.state.seconds, "question_s": state.seconds}
        state.seconds += made["seconds"]  # the first question pays for reading the prefix
        self.charged = True
        dropped = self.prompt.dropped_tokens if self.prompt is not None else 0
        return Reading(state, method, "once", note, window, None, dropped, prefix=made, charged_s=made["seconds"])
