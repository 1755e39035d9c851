"""What users type that kvcli must not misread or crash on: questions that look like paths, paths
that cannot be paths, outputs that cannot be written, text that is not UTF-8."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_chat import Terminal
from test_chat import folder as chat_folder  # noqa: F401  (a fixture: a tiny model, doc.txt and KVCLI_HOME)
from test_cli_tiny import doc, tiny  # noqa: F401  (fixtures: a 300-word doc.txt, a two-layer random Llama)
from test_cli_tiny import one_line_error, run, words

from kvcli.cli.ask import split_arguments
from kvcli.errors import InputError, OutputError
from kvcli.ingest import read_documents

LONG_QUESTION = "What is the code word mentioned in the note, and please explain carefully? " * 5  # 375 characters


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


def test_summarize_with_empty_stdin_shows_its_own_form(tiny, home):
    """`kvcli summarize < /dev/null` names `kvcli summarize FILE`, not only ask's question form."""
    one_line_error(run("summarize", "-m", tiny, input=""), "stdin is empty", "kvcli summarize FILE")


@pytest.mark.parametrize("command, says", [("summarize", "--focus"), ("chat", "kvcli> prompt")])
def test_question_typed_where_documents_go_is_refused(command, says, doc):
    """`summarize doc "focus on costs"` and `chat doc "Who?"` say the command takes no question, not that a file is missing."""
    one_line_error(run(command, doc, "what are the costs?", "-m", "no-such-model"), "reads as a question", says)


# item 2: a place kvcli cannot write is one line, found before the model loads where it can be


def read_only_folder(monkeypatch, folder: Path) -> None:
    """`folder` refuses new files as a read-only mount does (as root, chmod alone would not stop a write)."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, "Read-only file system", str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def bad_targets(tmp_path: Path, suffix: str) -> dict[str, Path]:
    """Places no output can go: under a file, in a missing folder, a folder itself, a read-only folder."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / f"adir{suffix}").mkdir()
    (tmp_path / "ro").mkdir()
    return {"Not a directory|is not a folder": tmp_path / "afile" / f"out{suffix}",
            "does not exist": tmp_path / "missing" / f"out{suffix}",
            "is a folder": tmp_path / f"adir{suffix}",
            "Read-only file system": tmp_path / "ro" / f"out{suffix}"}


@pytest.mark.parametrize("command, flag, suffix", [
    (["read", "DOC"], "-o", ".kvc"), (["compress", "DOC"], "-o", ".kvc"), (["inspect", "DOC"], "--plot", ".png"),
    (["eval", "--niah", "--haystack", "DOC"], "-o", ".json"), (["batch", "JOBS"], "-o", ".jsonl"),
])
def test_unwritable_output_is_refused_before_the_model_loads(command, flag, suffix, doc, tmp_path, monkeypatch, home):
    """Every output option refuses a place it cannot write, in one line naming it, before the model loads (no model exists)."""
    pytest.importorskip("matplotlib")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"documents": str(doc), "question": "w1?"}) + "\n")
    read_only_folder(monkeypatch, tmp_path / "ro")
    args = [str(doc) if a == "DOC" else str(jobs) if a == "JOBS" else a for a in command]
    for says, target in bad_targets(tmp_path, suffix).items():
        line = one_line_error(run(*args, flag, target, "-m", tmp_path / "no-model"))
        assert re.search(says, line) and target.name in line, line


def test_write_failing_part_way_is_one_line(tiny, home, doc, tmp_path, monkeypatch):
    """A disk that fills while the .kvc is written gives one line naming the file, and leaves no partial file."""
    target = tmp_path / "out" / "doc.kvc"
    target.parent.mkdir()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    one_line_error(run("read", doc, "-o", target, "-m", tiny), "cannot write", "doc.kvc", "No space left on device")
    assert list(target.parent.iterdir()) == []


def test_unwritable_kvcli_home_is_one_line(tiny, doc, tmp_path, monkeypatch):
    """A KVCLI_HOME kvcli cannot write (here under a file) is one line naming it and KVCLI_HOME, when the profile is first needed."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "afile" / "home"))
    monkeypatch.delenv("KVCLI_METHOD", raising=False)
    one_line_error(run("ask", doc, "w1?", "-m", tiny, "--method", "evidencekv"), "cannot write", "set KVCLI_HOME")


def test_read_only_kvcli_home_refuses_before_locking(tmp_path, monkeypatch):
    """A read-only KVCLI_HOME folder is found by making a file there, not by waiting on a lock that cannot be taken."""
    from kvcli.models.checkpoints import home_folder

    monkeypatch.setenv("KVCLI_HOME", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    read_only_folder(monkeypatch, tmp_path / "profiles")
    with pytest.raises(OutputError, match=r"Read-only file system.*set KVCLI_HOME"):
        home_folder("profiles")
    assert home_folder("models") == tmp_path / "models"


def test_failed_save_in_chat_keeps_the_session(chat_folder):
    """In a real terminal, /save to a place that cannot be written is one error line; the session answers and saves after it."""
    (chat_folder / "afile").write_text("x")
    term = Terminal(chat_folder, "--max-new-tokens", "4")
    said = term.command("/save afile/x.kvc")
    lines = [line for line in said.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvcli: error:") and "afile" in lines[0], said
    assert term.ask("w1?")[0]
    assert "saved" in term.command("/save good.kvc")
    assert term.leave("/exit") == 0
    assert (chat_folder / "good.kvc").is_file()


# item 8: text that is not UTF-8 is read in the encoding it was written in, and says so

WESTERN_WORDS = "Zürich café Straße naïve Genève façade schön très Müller Köln größer déjà élève señor año München Bücher über".split()
PLAIN_WORDS = "the meeting is on Tuesday and we will talk about the plan".split()


@pytest.mark.parametrize("text, encoding", [
    ("Zürich", "latin-1"),
    ("Die Sitzung in Zürich ist am Dienstag. Das Codewort ist PELIKAN.", "latin-1"),
    ("Le café est très apprécié à Genève, où l'été est doux.", "cp1252"),
    ("Привет, как дела? Встреча в Москве во вторник.", "cp1251"),
    ("これは日本語のテキストです。会議は火曜日です。", "shift_jis"),
])
def test_legacy_encodings_are_read_exactly_and_named(text, encoding, tmp_path):
    """A file in a legacy encoding reads as the text written, with one warning naming the file and the encoding assumed."""
    path = tmp_path / "old.txt"
    path.write_bytes(text.encode(encoding))
    doc = read_documents([str(path)])
    assert doc.text == text
    assert len(doc.warnings) == 1 and "old.txt is not UTF-8: read as" in doc.warnings[0]
    source = doc.sources[0]
    assert doc.encodings == {source.name: source.encoding} and f"read as {source.encoding}," in doc.warnings[0]


def test_utf8_names_no_encoding(tmp_path):
    """UTF-8 text (with or without a BOM) is read as it is, with no warning and no encoding recorded."""
    path = tmp_path / "new.txt"
    path.write_bytes("\ufeffZürich".encode("utf-8"))
    doc = read_documents([str(path)])
    assert doc.text == "Zürich" and doc.warnings == () and doc.encodings == {}


@pytest.mark.parametrize("raw", [
    "Le café est très apprécié à Genève, où l'été est doux.".encode("utf-8")[:-2] + "é".encode("utf-8")[:1],  # cut mid-character
    "Die Größe der Stadt München ist schön.".encode("utf-8").replace(b"Stadt", b"St\xe4dt"),  # one stray Latin-1 byte
    b"\xef\xbb\xbf" + "café déjà vu".encode("utf-8") + b"\xff",  # a BOM, then one bad byte
])
def test_damaged_utf8_keeps_its_accents(raw, tmp_path):
    """UTF-8 with a few bad bytes keeps every well-formed accented letter (only the bad bytes become U+FFFD), not one code page's mojibake."""
    path = tmp_path / "cut.txt"
    path.write_bytes(raw)
    doc = read_documents([str(path)])
    assert doc.text == raw.decode("utf-8-sig", errors="replace")
    assert doc.encodings == {} and "not valid UTF-8" in doc.warnings[0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(WESTERN_WORDS + PLAIN_WORDS), min_size=1, max_size=30).filter(lambda words: not " ".join(words).isascii()))
def test_western_text_in_cp1252_reads_back_exactly(words):
    """Western European text saved in cp1252 (or latin-1) is read back exactly: the code pages that tie with it lose."""
    text = " ".join(words)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "note.txt"
        path.write_bytes(text.encode("cp1252"))
        assert read_documents([str(path)]).text == text


def test_json_and_report_say_the_encoding_assumed(tiny, home, tmp_path, monkeypatch):
    """`ask --json` carries the encoding a non-UTF-8 document was read in, and the report on stderr names it."""
    monkeypatch.chdir(tmp_path)
    Path("old.txt").write_bytes(("Zürich " + words(50)).encode("latin-1"))
    data = run("ask", "old.txt", "w1?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "2", "--json")
    assert data.exit_code == 0, data.stderr
    assert json.loads(data.stdout)["stats"]["extra"]["encodings"] == {"old.txt": "cp1252"}
    text = run("ask", "old.txt", "w1?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "2")
    assert re.search(r"encoding\s+old\.txt: cp1252", text.stderr), text.stderr

