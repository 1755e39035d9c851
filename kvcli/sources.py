"""From scores on a prompt's positions to the passages of the documents they point at (`--sources`).

Token-free: what the engine scored is handed over as {character offset in `Document.text`: score}
(`SourceMap.char_scores` turns position scores into that). A passage is cut at sentence
boundaries in prose (PDF pages, text, stdin) and at line boundaries in code, around the sentence
or line that drew the most score, and is reported as its document, page (PDFs) and line range
within the source's body: line 1 is the first line after the `=== name ===` or
`--- name, page N ---` header that ingest adds.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .ingest.document import Document, Source
from .prompt import Prompt

# Prose: a sentence ends at . ! ? (and closing quotes or brackets) followed by space, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d)\]]*\s+|\n\s*\n")
_WORD = re.compile(r"\w+")
# A stop after these (or after a single capital, an initial) does not end the sentence: "Dr. Okafor", "e.g. this".
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "st", "prof", "vs", "etc", "e.g", "i.e", "no", "fig", "cf", "al", "jr", "sr", "inc", "ltd", "co"})
SHORT_SENTENCE = 40  # chars: a sentence shorter than this ("See below.") is shown with its neighbour
LONG_UNIT = 400  # chars: a prose "sentence" longer than this (a table, a list without stops) is cut at its lines
CODE_CONTEXT = 2  # lines shown above and below the line of code that drew the most score
HIGHLIGHTS = 4  # words highlighted per passage, at most


@dataclass(frozen=True)
class Passage:
    """One cited stretch of a document: where it is, its text, and its share of the score."""

    document: str  # the source's name (a path, or <stdin>)
    page: int | None  # 1-based PDF page, else None
    lines: tuple[int, int]  # first and last line, 1-based, within the source's body (a PDF page's own lines)
    text: str
    score: float  # the passage's share of all the score that fell on document text, in [0, 1]
    start: int  # the passage's span [start, end) in Document.text
    end: int
    highlights: tuple[tuple[int, int], ...] = ()  # spans in `text` of the words that drew the most score

    @property
    def label(self) -> str:
        """'report.pdf, page 3' or 'src/app.py:12-16'."""
        if self.page is not None:
            return f"{self.document}, page {self.page}"
        first, last = self.lines
        return f"{self.document}:{first}" if first == last else f"{self.document}:{first}-{last}"

    def to_dict(self) -> dict:
        """The passage as `--json` carries it (docs/json.md)."""
        return {"document": self.document, "page": self.page, "lines": list(self.lines), "text": self.text, "score": round(self.score, 4)}


@dataclass
class SourceMap:
    """What maps a cache's prompt positions back to the documents: the Document, and for each
    prompt position the character offset in `Document.text` where its token starts (-1: not
    document text, such as the chat template, a header cut marker or the question)."""

    document: Document
    offsets: list[int]

    @classmethod
    def of_prompt(cls, document: Document, prompt: Prompt) -> SourceMap:
        """The map of `prompt`'s positions (a document cut in the middle maps past its cut)."""
        offsets = []
        for position in range(len(prompt.token_starts)):
            offset = prompt.doc_offset(position)
            offsets.append(-1 if offset is None else offset)
        return cls(document, offsets)

    def char_scores(self, position_scores: dict[int, float]) -> dict[int, float]:
        """{char offset: score} from {prompt position: score}; positions outside the document drop out."""
        scores: dict[int, float] = {}
        for position, score in position_scores.items():
            if 0 <= position < len(self.offsets) and self.offsets[position] >= 0 and score > 0:
                offset = self.offsets[position]
                scores[offset] = scores.get(offset, 0.0) + score
        return scores


def body_start(document: Document, source: Source) -> int:
    """Where the source's own text starts in `Document.text`: after its header line, if it has one."""
    text = document.text
    if text.startswith(("=== ", "--- "), source.start):
        newline = text.find("\n", source.start, source.end)
        if newline >= 0:
            return newline + 1
    return source.start


def line_of(document: Document, source: Source, offset: int) -> int:
    """The 1-based line of `offset` within the source's body."""
    start = body_start(document, source)
    return document.text.count("\n", start, max(start, offset)) + 1


def _units(document: Document, source: Source) -> list[tuple[int, int]]:
    """The source's body as spans [start, end): lines for code, sentences for prose (long ones at their lines)."""
    text, start, end = document.text, body_start(document, source), source.end
    if source.kind == "code":
        return _split_lines(text, start, end)
    units = []
    cut = start
    for match in _SENTENCE_END.finditer(text, start, end):
        if _after_abbreviation(text, match.start(), start) and "\n\n" not in match.group():
            continue
        if match.start() > cut:
            units.extend(_long_at_lines(text, cut, match.start()))
        cut = match.end()
    if cut < end:
        units.extend(_long_at_lines(text, cut, end))
    return [(a, b) for a, b in units if text[a:b].strip()]


def _after_abbreviation(text: str, stop: int, start: int) -> bool:
    """Whether the stop that ends at `stop` closes an abbreviation or an initial rather than a sentence."""
    if stop == 0 or text[stop - 1] != ".":
        return False
    word_start = stop - 1
    while word_start > start and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start : stop - 1].lstrip("(\"'")
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper())


def _split_lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cut = [], start
    while cut < end:
        newline = text.find("\n", cut, end)
        stop = end if newline < 0 else newline
        spans.append((cut, stop))
        cut = stop + 1
    return spans


def _long_at_lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(start, end)] if end - start <= LONG_UNIT else _split_lines(text, start, end)


def passages(document: Document, scores: dict[int, float], count: int) -> list[Passage]:
    """The `count` best non-overlapping passages of `document` by `scores` ({char offset: score}).

    Each sentence (prose) or line (code) is scored by the sum of the scores of the tokens that
    start in it; from the best down, each becomes a passage (a short sentence with its
    neighbour, a line of code with CODE_CONTEXT lines each side) unless it overlaps one
    already chosen. A passage's score is its share of all the score on the documents.
    """
    total = sum(scores.values())
    if count < 1 or total <= 0:
        return []
    offsets = sorted(scores)
    prefix = [0.0]
    for offset in offsets:
        prefix.append(prefix[-1] + scores[offset])

    def between(start: int, end: int) -> float:
        return prefix[bisect.bisect_left(offsets, end)] - prefix[bisect.bisect_left(offsets, start)]

    candidates = []  # (score, source index, unit index)
    units_of: dict[int, list[tuple[int, int]]] = {}
    for index, source in enumerate(document.sources):
        if between(source.start, source.end) <= 0:
            continue
        units_of[index] = units = _units(document, source)
        candidates.extend((between(a, b), index, u) for u, (a, b) in enumerate(units))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen: list[Passage] = []
    for score, index, u in candidates:
        if len(chosen) == count or score <= 0:
            break
        source, units = document.sources[index], units_of[index]
        start, end = _around(document, source, units, u)
        if any(start < p.end and p.start < end for p in chosen):
            continue
        chosen.append(_passage(document, source, start, end, between(start, end) / total, scores, offsets))
    return chosen


def _around(document: Document, source: Source, units: list[tuple[int, int]], u: int) -> tuple[int, int]:
    """The span shown for unit `u`: a line of code with its neighbours, a short sentence with the next (or previous)."""
    if source.kind == "code":
        return units[max(0, u - CODE_CONTEXT)][0], units[min(len(units) - 1, u + CODE_CONTEXT)][1]
    start, end = units[u]
    if end - start < SHORT_SENTENCE and len(units) > 1:
        if u + 1 < len(units):
            end = units[u + 1][1]
        else:
            start = units[u - 1][0]
    return start, end


def _passage(document: Document, source: Source, start: int, end: int, share: float,
             scores: dict[int, float], offsets: list[int]) -> Passage:
    raw = document.text[start:end]
    lead = len(raw) - len(raw.lstrip())
    text = raw.strip()
    start, end = start + lead, start + lead + len(text)
    first = line_of(document, source, start)
    last = first + text.count("\n")
    return Passage(source.name, source.page, (first, last), text, share, start, end,
                   _highlights(document.text, start, end, scores, offsets))


def _highlights(text: str, start: int, end: int, scores: dict[int, float], offsets: list[int]) -> tuple[tuple[int, int], ...]:
    """Spans (relative to `start`) of the HIGHLIGHTS words in [start, end) whose tokens drew the most score."""
    inside = offsets[bisect.bisect_left(offsets, start) : bisect.bisect_left(offsets, end)]
    words: dict[tuple[int, int], float] = {}
    for offset in inside:
        word = _word_at(text, offset, start, end)
        if word is not None:
            words[word] = words.get(word, 0.0) + scores[offset]
    best = sorted(words, key=lambda w: -words[w])[:HIGHLIGHTS]
    return tuple(sorted((a - start, b - start) for a, b in best))


def _word_at(text: str, offset: int, start: int, end: int) -> tuple[int, int] | None:
    """The word a token starting at `offset` belongs to (a token may start on the space before it), or None."""
    while offset < end and not (text[offset].isalnum() or text[offset] == "_"):
        if text[offset] == "\n":
            return None
        offset += 1
    if offset >= end:
        return None
    a = offset
    while a > start and (text[a - 1].isalnum() or text[a - 1] == "_"):
        a -= 1
    match = _WORD.match(text, a, end)
    return (a, match.end()) if match else None


__all__ = ["Passage", "SourceMap", "body_start", "line_of", "passages"]
