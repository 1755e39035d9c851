"""The rows an eval scores: LongBench-style JSONL, needle-in-a-haystack grids, and the prompt each row reads."""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..ingest.jsonl import jsonl_records
from ..prompt import build_prompt, summary_instruction


@dataclass
class Row:
    """One sample in LongBench's layout; `niah` is (length, depth) for needle-in-a-haystack rows."""

    id: str
    context: str
    input: str  # the question; empty for summarization
    answers: list[str]
    niah: tuple[int, float] | None = None


def _text_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a string")
    return value.replace("NEWLINE_CHAR", "\n")  # LongBench's multi_news spells line breaks this way


def parse_row(record, index: int, where: str) -> Row:
    """A `Row` from one decoded JSON object; `where` names its place for errors."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with context, input and answers")
    context = _text_field(record, "context", where)
    question = _text_field(record, "input", where, required=False)
    answers = record.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: 'answers' must be a non-empty list of strings")
    row_id = record.get("_id", index)
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise InputError(f"{where}: '_id' must be a string or a number")
    return Row(id=str(row_id), context=context, input=question, answers=[a.replace("NEWLINE_CHAR", "\n") for a in answers])


def read_rows(path: str | Path, limit: int | None = None) -> list[Row]:
    """Rows from a LongBench-style JSONL file; blank lines are skipped, ids must be unique."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for record, line, where in jsonl_records(path, "data file"):
        row = parse_row(record, line - 1, where)
        if row.id in seen:
            raise InputError(f"{where}: _id {row.id!r} repeats line {seen[row.id]}; ids must be unique")
        seen[row.id] = line
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break  # the lines after it are not read
    if not rows:
        raise InputError(f"data file {path} has no rows")
    return rows


def prompt_parts(row: Row, template: str | None = None) -> tuple[str, str]:
    """(document, question) for `build_prompt`.

    Without a template: the context, then the input (or kvcli's summary instruction). With
    one, the filled template is the whole user message: it is split right after `{context}`,
    so build_prompt can cut a long context in its middle while the template's tail (the
    question) stays last, in the observation window. build_prompt joins the two halves with
    a blank line, which replaces the whitespace the template had at that seam.
    """
    question = row.input or summary_instruction()
    if template is None:
        return row.context, question
    check_template(template)
    head, tail = template.split("{context}", 1)
    fill = lambda text: text.replace("{input}", row.input).replace("{context}", row.context)  # noqa: E731
    return fill(head) + row.context, fill(tail).strip()


def check_template(template: str) -> None:
    """Refuse a --template without {context} or without a question after it."""
    if "{context}" not in template:
        raise InputError("--template must contain {context}")
    if not template.split("{context}", 1)[1].strip():
        raise InputError("--template needs text after {context} (the question): methods score the document from the prompt's last tokens")


def row_hash(row: Row) -> str:
    """A sha256 over a row's id, context, input, answers and NIAH cell.

    Every logged sample carries its row's hash, so a rerun on other data (or the same ids,
    which default to line numbers, over other lines) is refused instead of reusing old
    predictions, while a rerun with more rows (a larger --limit) resumes.
    """
    # one JSON list: unambiguous where the fields' text meets
    fields = [row.id, row.context, row.input, row.answers, list(row.niah) if row.niah is not None else None]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8")).hexdigest()


# --- needle in a haystack ---------------------------------------------------------------------

# After a sentence's closing punctuation (and quotes or brackets), or at a blank line (headings, lists).
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


def sentence_starts(text: str) -> list[int]:
    """Char offsets where a sentence may be inserted: 0, each sentence or paragraph start, and the end."""
    return [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]


def insert_needle(text: str, needle: str, depth: float) -> str:
    """`text` with `needle` at the sentence boundary nearest `depth` (0 start, 1 end)."""
    starts = sentence_starts(text)
    target = depth * len(text)
    at = min(starts, key=lambda s: abs(s - target))
    if at == len(text):
        return text.rstrip() + " " + needle
    return text[:at] + needle + " " + text[at:]


def niah_id(length: int, depth: float) -> str:
    """The id of the NIAH row at `length` tokens and `depth`, e.g. niah-L4000-d0.25."""
    return f"niah-L{length}-d{depth:g}"


def niah_rows(
    haystack_text: str,
    needle: str,
    question: str,
    answer: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    tokenizer,
) -> list[Row]:
    """A row per length x depth: a haystack prefix sized so the whole prompt is about `length` tokens.

    The prefix ends at a sentence end when one lies within 2% of the length (else mid-sentence,
    to keep the length), and the needle goes at the sentence boundary nearest each relative
    depth; depth 1 puts it after the whole prefix.
    """
    if not needle.strip() or not question.strip() or not answer.strip():
        raise InputError("--needle, --question and --answer must not be empty")
    if not lengths or not depths:
        raise InputError("give at least one --lengths and one --depths value")
    if any(not 0 <= d <= 1 for d in depths):
        raise InputError(f"--depths must lie in [0, 1], got {', '.join(f'{d:g}' for d in depths)}")
    empty = build_prompt(tokenizer, "", question, max_context=1 << 30)
    needle_len = len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
    overhead = len(empty) + needle_len
    encoded = tokenizer(haystack_text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    token_starts = [start for start, _ in offsets]
    ends = sentence_starts(haystack_text)[1:-1]
    rows = []
    for length in lengths:
        n_doc = length - overhead
        if n_doc < 16:
            raise InputError(f"--lengths {length} leaves no room for a haystack: the prompt and needle alone take {overhead} tokens")
        if n_doc > len(offsets):
            raise InputError(
                f"the haystack has {len(offsets)} tokens, but --lengths {max(lengths)} needs about {max(lengths) - overhead}; "
                "give a longer --haystack or shorter --lengths"
            )
        cut = offsets[n_doc - 1][1]
        # End on the sentence end nearest the cut, unless that moves the length by over 2%.
        i = bisect.bisect_left(ends, cut)
        nearest = min(ends[max(i - 1, 0) : i + 1], key=lambda e: abs(e - cut), default=cut)
        if abs(bisect.bisect_left(token_starts, nearest) - n_doc) <= 0.02 * length:
            cut = nearest
        body = haystack_text[:cut].rstrip()
        for depth in depths:
            rows.append(Row(id=niah_id(length, depth), context=insert_needle(body, needle, depth), input=question, answers=[answer], niah=(length, depth)))
    return rows
