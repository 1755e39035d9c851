"""kvcli.eval.data: LongBench rows, templates, the needle-in-a-haystack builder, and each row's hash."""

from __future__ import annotations

import json
import re

import pytest

from kvcli.errors import InputError
from kvcli.eval.data import Row, insert_needle, niah_rows, prompt_parts, read_rows, row_hash, sentence_starts
from kvcli.prompt import build_prompt, summary_instruction

NEEDLE = "The secret ingredient of the harbour soup is smoked paprika."
QUESTION = "What is the secret ingredient of the harbour soup?"


pytestmark = pytest.mark.usefixtures("one_thread")


# --- rows -----------------------------------------------------------------------------------------


def write_jsonl(path, *lines: str):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_read_longbench_layout(tmp_path):
    """Rows keep _id or take the line index, and multi_news' NEWLINE_CHAR becomes a line break."""
    path = write_jsonl(
        tmp_path / "d.jsonl",
        json.dumps({"context": "a NEWLINE_CHAR b", "input": "", "answers": ["x NEWLINE_CHARy"], "_id": "first"}),
        "",
        json.dumps({"context": "c", "input": "q?", "answers": ["y"]}),
    )
    rows = read_rows(path)
    assert [r.id for r in rows] == ["first", "2"]
    assert rows[0].context == "a \n b" and rows[0].answers == ["x \ny"]
    assert rows[1].input == "q?"
    assert [r.id for r in read_rows(path, limit=1)] == ["first"]


@pytest.mark.parametrize(
    "bad, words",
    [
        ("{not json", ["invalid JSON"]),
        (json.dumps({"input": "q", "answers": ["a"]}), ["context"]),
        (json.dumps({"context": "c", "answers": []}), ["answers"]),
        (json.dumps({"context": "c", "answers": [1]}), ["answers"]),
        (json.dumps(["a list"]), ["JSON object"]),
        (json.dumps({"context": "c", "answers": ["a"], "_id": "one"}), ["repeats line 1"]),
    ],
)
def test_bad_rows_name_their_line(tmp_path, bad, words):
    """A bad line is an InputError naming the file's line number and the problem."""
    good = json.dumps({"context": "c", "input": "q", "answers": ["a"], "_id": "one"})
    path = write_jsonl(tmp_path / "d.jsonl", good, bad)
    with pytest.raises(InputError) as info:
        read_rows(path)
    assert "d.jsonl:2" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_and_empty_data_files_are_input_errors(tmp_path):
    """A missing file or one without rows is an InputError."""
    with pytest.raises(InputError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no rows"):
        read_rows(write_jsonl(tmp_path / "empty.jsonl", ""))


def test_template_is_split_after_the_context():
    """A template's text up to {context} is the document and its tail the question, both filled."""
    row = Row("1", "DOC", "Who?", ["x"])
    document, question = prompt_parts(row, "Read {context}\n\nQuestion: {input}\nAnswer:")
    assert document == "Read DOC" and question == "Question: Who?\nAnswer:"
    assert prompt_parts(Row("2", "DOC", "", ["x"])) == ("DOC", summary_instruction())
    with pytest.raises(InputError, match="must contain {context}"):
        prompt_parts(row, "Question: {input}")
    with pytest.raises(InputError, match="needs text after {context}"):
        prompt_parts(row, "{input} {context}  ")


# --- a row's hash ---------------------------------------------------------------------------------

ROW = Row("0", "The cat sat.", "Who sat?", ["the cat", "a cat"], niah=(400, 0.5))


@pytest.mark.parametrize(
    "changed",
    [
        Row("9", "The cat sat.", "Who sat?", ["the cat", "a cat"], niah=(400, 0.5)),
        Row("0", "The dog sat.", "Who sat?", ["the cat", "a cat"], niah=(400, 0.5)),
        Row("0", "The cat sat.", "Who stood?", ["the cat", "a cat"], niah=(400, 0.5)),
        Row("0", "The cat sat.", "Who sat?", ["the cat"], niah=(400, 0.5)),
        Row("0", "The cat sat.", "Who sat?", ["the cat", "a cat"], niah=(400, 0.75)),
        Row("0", "The cat sat.", "Who sat?", ["the cat", "a cat"], niah=(500, 0.5)),
        Row("0", "The cat sat.", "Who sat?", ["the cat", "a cat"]),
    ],
    ids=["id", "context", "input", "answers", "niah-depth", "niah-length", "niah-none"],
)
def test_row_hash_changes_with_any_field(changed):
    """row_hash differs when a row's id, context, input, answers or NIAH cell differ."""
    assert row_hash(changed) != row_hash(ROW)


def test_row_hash_is_the_same_for_equal_rows_and_keeps_fields_apart(tmp_path):
    """Equal rows (read twice from a file, or read with a larger limit) hash alike; text moved from one field to the next does not."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"context": "ab", "input": "c", "answers": ["x"]}) + "\n" + json.dumps({"context": "d", "answers": ["y"]}) + "\n")
    assert [row_hash(r) for r in read_rows(path, limit=1)] == [row_hash(r) for r in read_rows(path)][:1]
    assert row_hash(read_rows(path)[0]) == row_hash(Row("0", "ab", "c", ["x"]))
    assert len(row_hash(ROW)) == 64  # a sha256 hex digest
    assert row_hash(Row("0", "ab", "c", ["x"])) != row_hash(Row("0", "a", "bc", ["x"]))
    assert row_hash(Row("0", "a", "", ["x", "y"])) != row_hash(Row("0", "a", "", ["x y"]))


# --- needle in a haystack ------------------------------------------------------------------------


def test_insert_needle_goes_to_sentence_boundaries():
    """The needle lands at the start, end, or the sentence boundary nearest the depth."""
    text = "One two. Three four five six! Seven eight? Nine ten eleven twelve."
    assert insert_needle(text, "N.", 0).startswith("N. One")
    assert insert_needle(text, "N.", 1).endswith("twelve. N.")
    middle = insert_needle(text, "N.", 0.5)
    assert "six! N. Seven" in middle




@pytest.mark.model
def test_niah_rows_hit_lengths_and_depths(tokenizer, haystack):
    """Each row's whole prompt is within 3% of its length, the needle sits at a sentence boundary near its depth."""
    lengths, depths = [400, 1200], [0, 0.25, 0.5, 0.75, 1]
    rows = niah_rows(haystack, NEEDLE, QUESTION, "smoked paprika", lengths, depths, tokenizer)
    assert [r.id for r in rows] == [f"niah-L{n}-d{d:g}" for n in lengths for d in depths]
    for row in rows:
        length, depth = row.niah
        document, question = prompt_parts(row)
        prompt = build_prompt(tokenizer, document, question, max_context=1 << 20)
        assert abs(len(prompt) - length) <= 0.03 * length, (row.id, len(prompt))
        assert row.context.count(NEEDLE) == 1
        at = row.context.index(NEEDLE)
        before, after = row.context[:at], row.context[at + len(NEEDLE):]
        assert before == "" or after == "" or re.search(r"([.!?][\"')\]]*\s+|\n\s*\n)$", before), before[-40:]
        assert after == "" or after.startswith(" ")
        body = before[:-1] if after == "" else before + after[1:]
        nearest = min(abs(s - depth * len(body)) for s in sentence_starts(body))
        assert abs(min(at, len(body)) - depth * len(body)) == nearest  # no boundary lies closer to the depth
        assert abs(at / len(body) - depth) < 0.15


@pytest.mark.model
def test_niah_haystack_too_short_fails_cleanly(tokenizer):
    """A haystack shorter than the longest length is an InputError saying how long it is."""
    with pytest.raises(InputError, match="haystack has"):
        niah_rows("Short text. Only two sentences.", NEEDLE, QUESTION, "paprika", [500], [0.5], tokenizer)
