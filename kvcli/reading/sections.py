"""Summaries of documents longer than the context by sections (map-reduce): the document is
split into sections that each fit the model's positions, each section is summarized on its own
(read query-aware with the run's method, keeping as many tokens per layer as one compressed read
of the whole document would), and the section summaries, joined, are
summarized by the instruction asked. When the joined summaries are still too long, they are
summarized in groups again, for at most `MAX_ROUNDS` rounds, each of which must shorten them; else
the read stops with what to raise. The joined summaries are already the compressed document, and
fit the context by construction: they are read whole (the full cache), not compressed again at
the run's ratio (which kept 25 of 250 summary tokens at ratio 0.1).

The other way past the context is one compressed reading (`query.QueryAware` re-indexed, the
instruction probing every chunk); docs/results.md measures both.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import InputError
from ..methods import Budget, Full, Method
from .answer import answer
from .query import QueryAware
from .reader import Options, Reader, Reading

PART_INSTRUCTION = "Summarize the document above, a part of a longer document, in a few sentences: its main points, names and numbers."
PART_TOKENS = 200  # the longest summary of one section
MAX_ROUNDS = 4  # rounds of section summaries: each shortens the text by about a section's length over a summary's
_BREAKS = re.compile(r"(?<=\n)\s*\n|(?<=[.!?])\s+")  # paragraph ends, then sentence ends


def split_sections(tokenizer, text: str, max_tokens: int) -> list[str]:
    """`text` cut into consecutive sections of at most `max_tokens` tokens each, at paragraph or
    sentence ends where there are any (a longer sentence is cut between tokens)."""
    pieces = [p for p in _pieces(text) if p.strip()]
    sections: list[str] = []
    current, current_len = "", 0
    for piece in pieces:
        n = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if n > max_tokens:  # one sentence longer than a section: cut it between tokens
            if current:
                sections.append(current)
                current, current_len = "", 0
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            sections.extend(tokenizer.decode(ids[i : i + max_tokens]) for i in range(0, len(ids), max_tokens))
            continue
        if current and current_len + n > max_tokens:
            sections.append(current)
            current, current_len = "", 0
        current += piece
        current_len += n
    if current.strip():
        sections.append(current)
    return sections


def _pieces(text: str) -> list[str]:
    """`text` split after every paragraph or sentence end, each piece keeping its trailing space."""
    pieces, start = [], 0
    for match in _BREAKS.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


@dataclass
class SectionSummaries:
    """What the map steps produced: the section summaries and what they cost."""

    sections: int  # sections of the document
    rounds: int  # map rounds (more than one when the joined summaries did not fit)
    seconds: float  # reading and decoding every section summary
    section_tokens: int  # the most tokens one section holds


class Sections:
    """Summarize a document too long for the context: each section, then the summaries."""

    name = "sections"

    def __init__(self, reader: Reader, document: str, options: Options) -> None:
        self.reader = reader
        self.document = document
        self.options = options
        # a section and its part instruction, plus the part summary, fit the context
        self.part_options = replace(options, max_new_tokens=min(PART_TOKENS, options.max_new_tokens), fit="cut")

    def _part_options(self, method: Method, prompt_tokens: int, question: int) -> Options:
        """Each section keeps the document tokens per layer that one compressed read of the whole
        document would (--ratio of the document, not of the section: a section at the document's ratio kept
        70 of 700 tokens a layer and its summaries lost the facts), so the memory is that read's; as
        that read keeps its last `question` tokens (the instruction) whole beside the budget, each
        section keeps its own instruction whole beside these."""
        plan, _ = self.reader.budget_plan(method, self.options.budget, prompt_tokens, question)
        if plan is None or self.options.budget.tokens is not None:
            return self.part_options
        document = plan.average - min(method.window_size, question)  # the plan's total holds the window's question tokens
        return replace(self.part_options, budget=Budget(tokens=max(method.window_size + 1, round(document))))

    def section_tokens(self) -> int:
        """The most document tokens one section holds: the context less the prompt around it and the summary's room."""
        around = len(self.reader.prompt("", PART_INSTRUCTION, self.part_options))
        return self.reader.context_limit(self.options) - self.part_options.max_new_tokens - around - 8

    def read(self, instruction: str, method: Method, on_section: Callable[[int, int], None] | None = None,
             on_layer: Callable[[int], None] | None = None) -> Reading:
        """The reading that answers `instruction` from the section summaries (decode it as any other)."""
        began = time.perf_counter()
        text, rounds, sections, size = self.document, 0, 0, self.section_tokens()
        if size < 64:
            raise InputError(f"--max-context {self.reader.context_limit(self.options)} leaves no room for a section and its summary; raise it")
        prompt_tokens = None  # the whole document's prompt, for the report: made by the first round's check
        shortest = None  # the shortest text read so far (tokens): every round must make it shorter
        while True:
            whole = QueryAware(self.reader, text, self.options)
            if not whole.past_window(instruction):
                break
            if prompt_tokens is None:
                prompt = whole.prompt(instruction)
                prompt_tokens = len(prompt)
                part_options = self._part_options(method, prompt_tokens, prompt.question_len)
            if rounds == MAX_ROUNDS or (shortest is not None and len(whole.prompt(instruction)) >= shortest):
                limit = self.reader.context_limit(self.options)
                raise InputError(
                    f"after {rounds} rounds of section summaries, the joined summaries ({len(whole.prompt(instruction)):,} tokens with "
                    f"the instruction) do not fit the {limit:,} positions read with room for the answer: raise --max-context, "
                    f"lower --max-new-tokens (a section's summary may take {part_options.max_new_tokens}), or pass --past compressed")
            shortest = len(whole.prompt(instruction))
            parts = split_sections(self.reader.tokenizer, text, size)
            sections = sections or len(parts)
            summaries = []
            for i, part in enumerate(parts):
                if on_section is not None:
                    on_section(i, len(parts))
                reading = QueryAware(self.reader, part, part_options).read(PART_INSTRUCTION, method)
                summaries.append(answer(self.reader, reading, part_options).text)
            if on_section is not None:
                on_section(len(parts), len(parts))
            rounds += 1
            text = "\n\n".join(f"Part {i + 1} of {len(parts)}: {s}" for i, s in enumerate(summaries))
        mapped_s = time.perf_counter() - began
        reduce = Full() if rounds else method  # the summaries fit the context: read them whole
        reading = whole.read(instruction, reduce, on_layer=on_layer)
        if rounds:
            kept = part_options.budget.label
            if part_options.budget != self.options.budget:
                kept += f" a section ({self.options.budget.label} of the whole document)"
        if reduce is not method:  # the note says what compressed the sections, not "method full keeps every token"
            reading.note = f"the sections were read with {method.name} at {kept}; their summaries whole"
        reading.mode = "sections" if rounds else reading.mode  # the sections' time is in this read's: nothing to charge
        if rounds:
            reading.past = {
                "prompt_tokens": prompt_tokens,
                "positions": self.reader.context_limit(self.options), "strategy": "sections",
                "sections": sections, "rounds": rounds, "section_tokens": size, "sections_s": round(mapped_s, 3),
                "section_method": method.name, "section_method_params": method.params(), "section_budget": kept,
                "summaries_read": "whole" if reduce is not method else method.name,
            }
        return reading
