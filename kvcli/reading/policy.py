"""The one decision of how a command reads its documents, and the one interface of the result.

`choose` picks the way to read (one pass, in chunks, past the context re-indexed, read once,
reused, a saved cache, by sections, compared with a full read) from the run's options and
questions; `ask`, `summarize`, `chat` and `batch` call it, and `eval` asks `one_capture_serves`
whether a setting's cache can be derived from one full capture (the same rule `--compare` uses).
Every mode answers the same calls (`Mode`), so no command needs to know which one it holds.

A new way of reading is its own file (a `Mode`, or a class this wraps) and one rule in `choose`.
The classes wrapped here (`QueryAware`, `ReadOnce`, `Reused`, `Prefix`, `Sections`) keep their
own interfaces, which `eval` also uses to capture once and derive many settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..methods import Budget, Full, Method
from ..prompt import Prompt
from ..sources import SourceMap
from .once import PREFIX_WINDOW, ReadOnce
from .prefix import DEFAULT_SCORER, Prefix, Reused
from .query import QueryAware
from .reader import Options, Reader, Reading
from .sections import Sections
from .skim import Skim

OnLayer = Callable[[int], None] | None
OnSection = Callable[[int, int], None] | None


class Mode:
    """One way of reading documents for questions, as every command uses it."""

    name = ""
    bar = "layers"  # the progress `read` reports: "layers" (on_layer), "sections" (on_section), "" (none worth a bar)
    extra: dict = {}  # added to every answer's report (a prefix's scorer and what it cost)
    preparing = ""  # what `prepare` still has to read, for its progress bar ("": nothing)
    method: Method | None = None  # the method the mode chose itself (a reused prefix's), else the command's

    def prompt(self, question: str) -> Prompt | None:
        """The prompt whose cut or length the command warns about before reading (None: nothing to say)."""
        return None

    def note(self, question: str) -> str:
        """What the command says before reading for `question`, or ""."""
        return ""

    def prepare(self, on_layer: OnLayer = None) -> None:
        """Read what every question shares, once (nothing for a mode that reads per question)."""

    def check(self, question: str, method: Method, budget: Budget | None = None) -> None:
        """Refuse, before any reading, what this mode cannot read."""

    def read(self, question: str, method: Method, budget: Budget | None = None,
             on_layer: OnLayer = None, on_section: OnSection = None) -> Reading:
        raise NotImplementedError

    def source_map(self, reading: Reading, document) -> SourceMap | None:
        """What maps `reading`'s positions back to `document` (an ingest `Document`; None when the
        cache was saved, which carries its own), for --sources; None where nothing does."""
        if reading.prompt is None or document is None:
            return None
        return SourceMap.of_prompt(document, reading.prompt)


class OnePass(Mode):
    """Query-aware: one read per question, in one pass, in chunks, or past the context re-indexed."""

    name = "query"

    def __init__(self, query: QueryAware) -> None:
        self.query = query

    def prompt(self, question: str) -> Prompt:
        return self.query.prompt(question)

    def check(self, question, method, budget=None) -> None:
        self.query.check(question, method, budget)

    def read(self, question, method, budget=None, on_layer=None, on_section=None) -> Reading:
        return self.query.read(question, method, budget, on_layer=on_layer)


class Once(Mode):
    """Read once, compress per question (`reading.ReadOnce`); the prefix is read by `prepare`."""

    name = "once"
    bar = ""

    def __init__(self, once: ReadOnce) -> None:
        self.once = once
        self.said = ""  # why this read, when another was asked for (--skim with many questions)

    def note(self, question: str) -> str:
        return self.said

    @property
    def extra(self) -> dict:
        return {"skim_choice": self.said} if self.said else {}

    @property
    def preparing(self) -> str:
        return "reading once" if self.once.prefix is None else ""

    def prompt(self, question: str) -> Prompt | None:
        return self.once.layout() if self.once.prefix is None else None  # said once, before the prefix is read

    def prepare(self, on_layer=None) -> None:
        self.once.read_prefix(on_layer)

    def read(self, question, method, budget=None, on_layer=None, on_section=None) -> Reading:
        return self.once.read(question, method, budget)

    def source_map(self, reading, document) -> SourceMap | None:
        # the prefix's positions are the prompt's it was cut from, or a saved prefix's own map
        if self.once.prompt is not None and document is not None:
            return SourceMap.of_prompt(document, self.once.prompt)
        return self.once.source_map


class Prefixed(Mode):
    """Every question after one question-agnostic prefix: compressed by `prepare` (`--reuse`), or saved."""

    bar = ""

    def __init__(self, reader: Reader, options: Options, prefix: Prefix | None = None,
                 reused: Reused | None = None, method: Method | None = None) -> None:
        self.reader, self.options = reader, options
        self.prefix, self.reused, self.method = prefix, reused, method
        self.name = "saved" if reused is None else "reused"

    @property
    def extra(self) -> dict:
        return self.prefix.extra if self.prefix is not None else {}

    @property
    def preparing(self) -> str:
        return "compress" if self.prefix is None else ""

    def prompt(self, question: str) -> Prompt | None:
        return self.reused.prompt if self.prefix is None else None

    def prepare(self, on_layer=None) -> None:
        if self.prefix is None:
            self.prefix = self.reused.read(self.method, on_layer=on_layer)

    def read(self, question, method, budget=None, on_layer=None, on_section=None) -> Reading:
        return self.prefix.ask(self.reader, question, self.options)

    def source_map(self, reading, document) -> SourceMap | None:
        return super().source_map(reading, document) or self.prefix.source_map


class BySections(Mode):
    """Past the context, a summary of each section, then of the summaries (`reading.Sections`)."""

    name = "sections"
    bar = "sections"

    def __init__(self, sections: Sections) -> None:
        self.sections = sections

    def note(self, question: str) -> str:
        limit = self.sections.reader.context_limit(self.sections.options)
        skim = " (--skim does not apply: each section is read whole)" if self.sections.options.skim is not None else ""
        return f"kvcli: the documents are longer than the {limit:,} positions the model reads: summarizing them section by section, then the summaries{skim}"

    def read(self, question, method, budget=None, on_layer=None, on_section=None) -> Reading:
        return self.sections.read(question, method, on_section=on_section, on_layer=on_layer)


class Skimmed(Mode):
    """The documents through the first layers, the chosen tokens through all (`reading.Skim`), per question."""

    name = "skim"

    def __init__(self, skim: Skim, note: str = "") -> None:
        self.skim = skim
        self._note = note

    @property
    def extra(self) -> dict:
        return {"skim_choice": self._note} if self._note else {}

    def prompt(self, question: str) -> Prompt:
        return self.skim.prompt(question)

    def note(self, question: str) -> str:
        return self._note

    def check(self, question, method, budget=None) -> None:
        self.skim.check(question, method, budget)

    def read(self, question, method, budget=None, on_layer=None, on_section=None) -> Reading:
        return self.skim.read(question, method, budget, on_layer=on_layer)


class Compare(OnePass):
    """The read the user would get, and beside it a full read that is possible (`ask --compare`).

    Where the user's read is one pass, both caches come from one full capture (the same caches,
    tested). Otherwise (chunks asked or chosen by the method, or past the context) the user's read
    runs as it would alone, and the full cache is read apart: of the same prompt where it fits
    the positions, else of the documents cut in the middle to fit (`full_label` says so), since
    no full read reaches past the positions the model reads.
    """

    name = "compare"

    def __init__(self, query: QueryAware, reader: Reader, text: str, options: Options, skim: Skim | None = None) -> None:
        super().__init__(query)
        self.reader, self.text, self.options, self.skim = reader, text, options, skim
        self._full: Callable[[], Reading] | None = None
        self.full_label = "full cache"

    def read(self, question, method, budget=None, on_layer=None, on_section=None) -> Reading:
        query = self.query
        if self.skim is None and one_capture_serves(query, question, method, budget):
            captured = query.capture(question, method.window_size, method.needs_accumulated, on_layer)
            self._full, self.full_label = (lambda: query.derive(captured, question, Full())), "full cache"
            return query.derive(captured, question, method, budget)
        if self.skim is not None:
            reading = self.skim.read(question, method, budget, on_layer=on_layer)
        else:
            reading = query.read(question, method, budget, on_layer=on_layer)
        if query.past_window(question):
            cut = QueryAware(self.reader, self.text, replace(self.options, fit="cut"))
            fits = self.reader.context_limit(self.options)
            self._full = lambda: cut.read(question, Full())
            self.full_label = f"full cache of the documents cut in the middle to the {fits:,} positions the model reads"
        else:
            self._full, self.full_label = (lambda: query.read(question, Full())), "full cache"
        return reading

    def full(self) -> Reading:
        """The full reading beside the last `read` (read now where it was not captured with it)."""
        return self._full()


def one_capture_serves(query: QueryAware, question: str, method: Method, budget: Budget | None = None,
                       chunk_size: int | None = None) -> bool:
    """Whether the cache a live read keeps can be derived from one full capture of the prompt:
    only a one-pass read (no chunks asked or chosen by the method, within the positions)."""
    return query.live_chunks(question, method, budget, chunk_size) is None


def choose(reader: Reader, text: str | None, options: Options, method: Method, questions: list[str] | None, *,
           reuse: bool = False, compare: bool = False, saved=None, past: str = "compressed",
           scorer: str = DEFAULT_SCORER, agnostic: Method | None = None) -> Mode:
    """How to read `text` for `questions` (None: not known yet, as in `chat`, which may ask many).

    The rules, in order:
    - a saved cache (`saved`: a `ReadOnce` over a full `.kvc`, or a compressed `Prefix`) is read after;
    - `reuse`: one question-agnostic prefix for every question, compressed by `agnostic` (the
      default method of such a prefix, when the user named none) where the repeat ranks it;
    - past the positions, with `past="sections"`: section by section (`summarize`);
    - `compare`: the read below as it would be, beside a full read that is possible;
    - several questions (or unknown ones), no --chunk-size, within the positions: read once,
      compress per question (the same caches as one pass each); with --skim, read once only where
      that costs less than skimming for each question (said before reading);
    - else one query-aware read per question (in chunks, or re-indexed past the positions), or a
      skim per question with --skim.
    """
    if saved is not None:
        return Once(saved) if isinstance(saved, ReadOnce) else Prefixed(reader, options, prefix=saved)
    if reuse:
        reused = Reused(reader, text, options, scorer)
        return Prefixed(reader, options, reused=reused, method=reused.method_for(method, agnostic))
    query = QueryAware(reader, text, options)
    longest = QUESTION_ROOM if questions is None else max(questions, key=lambda q: len(reader.tokenizer(q)["input_ids"]))
    is_past = options.fit == "reindex" and query.past_window(longest)
    if is_past and past == "sections":
        return BySections(Sections(reader, text, options))
    skim = Skim(reader, query, options.skim) if options.skim is not None else None
    if compare:
        return Compare(query, reader, text, options, skim)
    once = (questions is None or len(questions) > 1) and options.chunk_size is None and not is_past
    note = ""
    if skim is not None and once and questions is not None:
        share = skim.fraction(longest)  # of a one-pass read, per question
        if share * len(questions) < 1:
            return Skimmed(skim, f"kvcli: skimming for each of the {len(questions)} questions (about {share:.0%} of a full read each) "
                                 "costs less than reading the documents once")
        note = (f"kvcli: reading the documents once for the {len(questions)} questions costs less than skimming for each "
                f"(about {share:.0%} of a full read each): --skim is not used")
    elif skim is not None:
        return Skimmed(skim)
    if once:
        mode = Once(ReadOnce(reader, text, options, window_size=max(PREFIX_WINDOW, method.window_size),
                             accumulated=method.needs_accumulated, longest_question=longest))
        mode.said = note
        return mode
    return OnePass(query)


# Questions not known when the documents are read (chat) leave room, in a document cut to fit,
# for a question of about this many words, and its answer.
QUESTION_ROOM = " ".join(["word"] * 64)

__all__ = ["QUESTION_ROOM", "Compare", "Mode", "Skimmed", "choose", "one_capture_serves"]
