"""What users type that kvcli must not misread or crash on: questions that look like paths, paths
that cannot be paths, outputs that cannot be written, text that is not UTF-8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_tiny import one_line_error, run, words
from test_models import save_tiny_llama

from kvcli.cli.ask import split_arguments
from kvcli.errors import InputError
from kvcli.ingest import read_documents

LONG_QUESTION = "What is the code word mentioned in the note, and please explain carefully? " * 5  # 375 characters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A two-layer random Llama folder with 1,024 positions."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024))


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(words(300))
    return path


# item 1: a question longer than a file name may be


def test_question_longer_than_a_file_name_is_asked(tiny, home, doc):
    """A 375-character question as the last argument is answered, not a crash on ENAMETOOLONG."""
    result = run("ask", doc, LONG_QUESTION, "-m", tiny, "--method", "snapkv", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert json.loads(result.stdout)["question"] == LONG_QUESTION


@pytest.mark.parametrize("text", [LONG_QUESTION, "What does " + "x" * 300 + "/y mean?", "x\0y"])
def test_text_that_cannot_be_a_path_is_a_question(text, doc):
    """Text the OS refuses as a path (too long a name or part, a NUL) is taken as the question."""
    assert split_arguments([str(doc), text], None, None) == ([str(doc)], [text])


def test_a_document_path_the_os_refuses_is_one_line(tmp_path, monkeypatch):
    """A document path too long for the OS, or behind a folder that cannot be searched, is an InputError naming it."""
    with pytest.raises(InputError, match="File name too long"):
        read_documents(["a" * 300])
    locked = tmp_path / "locked" / "notes.txt"
    real_stat = Path.stat

    def stat(path, **kwargs):
        if path == locked:  # as root, a chmod'ed folder is still searchable: refuse at the OS boundary
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(InputError, match=r"notes\.txt cannot be read: Permission denied"):
        read_documents([str(locked)])


# item 5: a last argument that reads as a file name is not asked as a question


@pytest.mark.parametrize("typo", ["nots.txt", "notes/nots", "report.PDF", "./notes"])
def test_mistyped_file_is_not_asked_as_the_question(typo, doc, tmp_path, monkeypatch):
    """`ask notes.txt nots.txt`: a missing last argument shaped like a path is an error naming it and pointing at -q."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=rf"{typo!r} does not exist.*-q") as raised:
        split_arguments([str(doc), typo], None, None)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("question", ["Who objected?", "What changed in v1.2?", "Why", "e.g.", "Summarize notes.txt please"])
def test_questions_are_still_questions(question, doc, tmp_path, monkeypatch):
    """Questions with dots, a single word or a file name among other words are asked as given."""
    monkeypatch.chdir(tmp_path)
    assert split_arguments([str(doc), question], None, None) == ([str(doc)], [question])


def test_documents_beside_cache_are_refused(doc):
    """`ask --cache doc.kvc other.txt "Q"` refuses, naming the documents, instead of asking "other.txt"."""
    with pytest.raises(InputError, match=r"with --cache, give no documents \(other\.txt\).*-q"):
        split_arguments(["other.txt", "Q?"], None, "doc.kvc")
    with pytest.raises(InputError, match=r"is a file, not a question.*--cache"):
        split_arguments([str(doc)], None, "doc.kvc")
    assert split_arguments(["Q?"], None, "doc.kvc") == ([], ["Q?"])


def test_mistyped_second_file_fails_on_the_command_line(tiny, home, doc):
    """`kvcli ask notes.txt nots.txt` exits 2 with one line naming nots.txt, without loading the model."""
    one_line_error(run("ask", doc, "nots.txt", "-m", "no-such-model"), "'nots.txt' does not exist", "-q")


# item 6: a forgotten question with stdin not a terminal


def test_forgotten_question_with_empty_stdin_says_the_question_is_missing(tiny, home, doc):
    """`kvcli ask doc.txt < /dev/null` says the question is missing, not that stdin is empty."""
    line = one_line_error(run("ask", doc, "-m", tiny, input=""), "the question is missing")
    assert "stdin is empty" not in line


@pytest.mark.parametrize("command, says", [("summarize", "--focus"), ("chat", "kvcli> prompt")])
def test_question_typed_where_documents_go_is_refused(command, says, doc):
    """`summarize doc "focus on costs"` and `chat doc "Who?"` say the command takes no question, not that a file is missing."""
    one_line_error(run(command, doc, "what are the costs?", "-m", "no-such-model"), "reads as a question", says)
