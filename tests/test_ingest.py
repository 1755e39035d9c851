"""Model-free tests of kvcli.ingest: files, folders, stdin and PDFs into one Document."""

import fnmatch
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pdfutil import pdf_bytes
from pypdf import PdfReader, PdfWriter

from kvcli.errors import InputError
from kvcli.ingest import Document, Source, read_documents

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def write(path: Path, content: str | bytes) -> Path:
    """Write a file, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def encrypted(data: bytes, user_password: str, owner_password: str = "owner") -> bytes:
    """The PDF `data` encrypted with pypdf's default (pure-Python RC4) algorithm."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password, owner_password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def text_of(doc: Document, source: Source) -> str:
    """The slice of the document that a source covers."""
    return doc.text[source.start : source.end]


def test_single_text_file_has_no_header(tmp_path, monkeypatch):
    """A lone text file becomes the whole text, one 'text' source, no header."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "notes.txt", "Hello there.\r\nSecond line.\n\n")
    doc = read_documents(["notes.txt"])
    assert doc.text == "Hello there.\nSecond line."
    (source,) = doc.sources
    assert (source.name, source.kind, source.start, source.end, source.page) == (
        "notes.txt", "text", 0, len(doc.text), None,
    )
    assert len(source.sha256) == 64 and doc.warnings == ()


def test_markdown_file_is_text(tmp_path):
    """A markdown file is kind 'text' and keeps its content."""
    path = write(tmp_path / "README.md", "# Title\n\nSome *markdown*.\n")
    doc = read_documents([str(path)])
    assert doc.sources[0].kind == "text"
    assert doc.text == "# Title\n\nSome *markdown*."


def test_single_code_file_gets_header(tmp_path, monkeypatch):
    """A code file is headed by its path even when it is the only input."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "app.py", "print('hi')\n")
    doc = read_documents(["./app.py"])
    assert doc.text == "=== app.py ===\nprint('hi')"
    assert doc.sources[0].kind == "code" and doc.label(doc.sources[0]) == "app.py"


def test_code_folder_respects_gitignore_hidden_and_binary(tmp_path, monkeypatch):
    """A folder walk is sorted, honours nested .gitignore files, skips hidden and binary files."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "src/.gitignore", "*.log\nbuild/\n")
    write(tmp_path / "src/app.py", "import util\n")
    write(tmp_path / "src/util.py", "X = 1\n")
    write(tmp_path / "src/debug.log", "ignored\n")
    write(tmp_path / "src/build/out.py", "ignored\n")
    write(tmp_path / "src/.secret/key.py", "hidden\n")
    write(tmp_path / "src/.env", "hidden\n")
    write(tmp_path / "src/logo.png", b"\x89PNG\r\n")
    write(tmp_path / "src/blob", b"abc\x00def")
    write(tmp_path / "src/docs/.gitignore", "draft.md\n!keep.log\n")
    write(tmp_path / "src/docs/guide.md", "Guide.\n")
    write(tmp_path / "src/docs/draft.md", "ignored\n")
    write(tmp_path / "src/docs/keep.log", "re-included by the nested .gitignore\n")
    write(tmp_path / "src/empty.py", "")

    doc = read_documents(["src"])
    names = [s.name for s in doc.sources]
    assert names == ["src/app.py", "src/docs/guide.md", "src/docs/keep.log", "src/util.py"]
    assert [s.kind for s in doc.sources] == ["code", "text", "text", "code"]
    assert doc.text.startswith("=== src/app.py ===\nimport util")
    assert "=== src/docs/guide.md ===\nGuide." in doc.text
    assert "ignored" not in doc.text and "hidden" not in doc.text
    (warning,) = doc.warnings
    assert "skipped 2 binary files" in warning and "src/blob" in warning and "logo.png" in warning


def test_several_paths_are_concatenated_with_headers(tmp_path):
    """Several inputs are joined in order, each under a header, with spans that match."""
    a = write(tmp_path / "a.txt", "Alpha.")
    b = write(tmp_path / "b.md", "Beta.")
    doc = read_documents([str(a), str(b)])
    assert doc.text == f"=== {a} ===\nAlpha.\n\n=== {b} ===\nBeta."
    assert [text_of(doc, s) for s in doc.sources] == [f"=== {a} ===\nAlpha.", f"=== {b} ===\nBeta."]
    assert doc.source_at(doc.text.index("Beta")) == doc.sources[1]
    assert doc.source_at(doc.sources[0].end) is None  # the blank line between sources


def test_same_file_twice_is_read_once(tmp_path):
    """A file named twice, or named and inside a given folder, is read once."""
    path = write(tmp_path / "d/a.txt", "Alpha.")
    write(tmp_path / "d/b.txt", "Beta.")
    doc = read_documents([str(path), str(tmp_path / "d"), str(path)])
    assert [s.name for s in doc.sources] == [str(path), str(tmp_path / "d" / "b.txt")]


def test_stdin_alone_and_with_files(tmp_path):
    """'-' reads the stdin argument; alone it has no header, with files it is headed '<stdin>'."""
    doc = read_documents(["-"], stdin=io.StringIO("piped text\n"))
    assert doc.text == "piped text"
    assert doc.sources[0].name == "<stdin>" and doc.sources[0].kind == "stdin"

    path = write(tmp_path / "a.txt", "Alpha.")
    doc = read_documents([str(path), "-"], stdin=io.StringIO("piped"))
    assert doc.text.endswith("=== <stdin> ===\npiped")


def test_stdin_bytes_buffer_handles_pdf():
    """A stdin with a byte buffer may carry a PDF."""
    stdin = io.TextIOWrapper(io.BytesIO(pdf_bytes([["From a pipe."]])))
    doc = read_documents(["-"], stdin=stdin)
    assert doc.sources[0].kind == "pdf" and "From a pipe." in doc.text


def test_empty_stdin_and_stdin_twice_fail():
    """Empty stdin is refused, and so is '-' given twice."""
    with pytest.raises(InputError, match="stdin is empty"):
        read_documents(["-"], stdin=io.StringIO("  \n"))
    with pytest.raises(InputError, match="more than once"):
        read_documents(["-", "-"], stdin=io.StringIO("x"))


def test_sample_pdf_has_one_source_per_page():
    """The sample PDF gives one 'pdf' source per page, headed and labelled with its page number."""
    doc = read_documents([str(SAMPLES / "python_exceptions.pdf")])
    assert [s.page for s in doc.sources] == [1, 2, 3]
    assert {s.kind for s in doc.sources} == {"pdf"} and len({s.sha256 for s in doc.sources}) == 1
    name = doc.sources[0].name
    for source in doc.sources:
        assert text_of(doc, source).startswith(f"--- {name}, page {source.page} ---\n")
    assert doc.label(doc.sources[2]) == f"{name} p.3"
    assert "raise" in text_of(doc, doc.sources[1])


def test_pdf_detected_by_magic_and_textless_pages_warn(tmp_path):
    """A PDF is found by its magic bytes; pages without text are left out with a warning."""
    path = write(tmp_path / "report.bin.data", pdf_bytes([["Page one."], [], ["Page three."]]))
    doc = read_documents([str(path)])
    assert [s.page for s in doc.sources] == [1, 3]
    assert "Page three." in text_of(doc, doc.sources[1])
    assert len(doc.warnings) == 1 and "pages 2" in doc.warnings[0]


def test_encrypted_pdf_with_password_fails(tmp_path):
    """A PDF that needs a password is refused with advice to decrypt it."""
    path = write(tmp_path / "secret.pdf", encrypted(pdf_bytes([["Hidden text."]]), "s3cret"))
    with pytest.raises(InputError, match=r"secret\.pdf is encrypted; decrypt it first"):
        read_documents([str(path)])


def test_encrypted_pdf_with_empty_password_is_read(tmp_path):
    """A PDF encrypted with only an owner password opens with the empty password."""
    path = write(tmp_path / "owner.pdf", encrypted(pdf_bytes([["Readable text."]]), ""))
    doc = read_documents([str(path)])
    assert "Readable text." in doc.text


def test_pdf_without_text_layer_suggests_ocr(tmp_path):
    """A PDF whose pages hold no text operators is refused as scanned, suggesting OCR."""
    path = write(tmp_path / "scan.pdf", pdf_bytes([[], []]))
    with pytest.raises(InputError, match="no text layer.*ocrmypdf"):
        read_documents([str(path)])


@pytest.mark.parametrize("content", [b"just some text", b"%PDF-1.4\ngarbage without objects"])
def test_invalid_pdf_fails(tmp_path, content):
    """A .pdf file that is not a readable PDF is refused as invalid."""
    path = write(tmp_path / "bad.pdf", content)
    with pytest.raises(InputError, match=r"bad\.pdf is not a valid PDF"):
        read_documents([str(path)])


def test_broken_pdf_in_folder_is_skipped_with_warning(tmp_path):
    """Inside a folder, an unreadable PDF becomes a warning rather than an error."""
    write(tmp_path / "d/bad.pdf", b"not a pdf")
    write(tmp_path / "d/notes.txt", "Notes.")
    doc = read_documents([str(tmp_path / "d")])
    assert [s.name.rsplit("/", 1)[-1] for s in doc.sources] == ["notes.txt"]
    assert any("bad.pdf is not a valid PDF" in w for w in doc.warnings)


def test_missing_path_fails(tmp_path):
    """A path that does not exist is refused by name."""
    with pytest.raises(InputError, match=r"nope\.txt does not exist"):
        read_documents([str(tmp_path / "nope.txt")])


def test_no_paths_fails():
    """Calling with no paths at all is a user error."""
    with pytest.raises(InputError, match="no input"):
        read_documents([])


@pytest.mark.parametrize("content", ["", " \n\t\n"])
def test_empty_file_fails(tmp_path, content):
    """An empty or whitespace-only file is refused as empty."""
    path = write(tmp_path / "empty.txt", content)
    with pytest.raises(InputError, match=r"empty\.txt is empty"):
        read_documents([str(path)])


@pytest.mark.parametrize("name,content", [("data.bin", b"\x00\x01\x02"), ("photo.jpg", b"text?")])
def test_binary_file_fails(tmp_path, name, content):
    """A binary file given by name (NUL bytes or a binary extension) is refused."""
    path = write(tmp_path / name, content)
    with pytest.raises(InputError, match="looks like a binary file"):
        read_documents([str(path)])


def test_folder_without_text_fails(tmp_path):
    """A folder holding only binary, hidden or empty files is refused."""
    write(tmp_path / "d/a.png", b"\x89PNG")
    write(tmp_path / "d/.hidden.txt", "hidden")
    write(tmp_path / "d/empty.txt", "")
    with pytest.raises(InputError, match="has no readable text files"):
        read_documents([str(tmp_path / "d")])
    (tmp_path / "e").mkdir()
    with pytest.raises(InputError, match="has no readable text files"):
        read_documents([str(tmp_path / "e")])


def test_undecodable_file_is_decoded_with_a_warning(tmp_path):
    """Bytes no encoding reads cleanly (every byte from 0x80 up) become U+FFFD and the warning names the file."""
    path = write(tmp_path / "noise.txt", b"noise " + bytes(range(0x80, 0x100)))
    doc = read_documents([str(path)])
    assert doc.text.startswith("noise \ufffd") and doc.encodings == {}
    assert len(doc.warnings) == 1 and "noise.txt is not valid UTF-8" in doc.warnings[0]


def test_unknown_extension_with_text_is_read(tmp_path):
    """A file with an unknown extension that holds text is read as text; a BOM is dropped."""
    path = write(tmp_path / "notes.weird", "\ufeffplain words")
    doc = read_documents([str(path)])
    assert doc.text == "plain words" and doc.sources[0].kind == "text"


def test_progress_is_called_after_each_file(tmp_path):
    """progress(done, total) is reported once per file, in order."""
    for name in "abc":
        write(tmp_path / f"{name}.txt", name)
    calls = []
    read_documents([str(tmp_path)], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_reading_writes_nothing(tmp_path):
    """Reading a folder leaves it exactly as it was."""
    write(tmp_path / "a.py", "x = 1")
    write(tmp_path / "b.pdf", pdf_bytes([["Page."]]))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    read_documents([str(tmp_path)])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def has_text(content: str) -> bool:
    """Whether ingest keeps a file: something besides whitespace once a UTF-8 BOM is dropped."""
    return bool(content.removeprefix("\ufeff").strip())


file_names = st.builds(
    str.__add__,
    st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=8),
    st.sampled_from([".txt", ".md", ".py", ""]),
)
file_texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)


def read_folder(files: dict[str, str]) -> Document | None:
    """`read_documents` over a temporary folder holding `files`; None when it has no text."""
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            write(Path(folder) / name, content)
        try:
            return read_documents([folder])
        except InputError:
            return None


@settings(max_examples=60, deadline=None)
@given(files=st.dictionaries(file_names, file_texts, min_size=1, max_size=6))
def test_sources_tile_the_text(files):
    """Spans lie in the text, ordered and disjoint, and source_at maps each offset to its span."""
    doc = read_folder(files)
    if doc is None:
        assert not any(has_text(content) for content in files.values())
        return

    previous_end = 0
    for source in doc.sources:
        assert previous_end <= source.start < source.end <= len(doc.text)
        previous_end = source.end
    owner = [None] * len(doc.text)
    for source in doc.sources:
        owner[source.start : source.end] = [source] * (source.end - source.start)
    assert [doc.source_at(i) for i in range(len(doc.text))] == owner
    assert doc.source_at(len(doc.text)) is None
    assert len(doc.sources) == sum(1 for content in files.values() if has_text(content))


@settings(max_examples=60, deadline=None)
@given(files=st.dictionaries(file_names, file_texts, min_size=1, max_size=6))
def test_every_file_text_survives(files):
    """Each file's text appears whole at the end of its source's span (newlines normalized, trailing blanks trimmed)."""
    doc = read_folder(files)
    if doc is None:
        return  # no file with text: test_sources_tile_the_text checks this case
    by_name = {source.name.rsplit("/", 1)[-1]: source for source in doc.sources}
    for name, content in files.items():
        if has_text(content):
            body = content.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").rstrip()
            assert text_of(doc, by_name[name]).endswith(body)


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".pdf", ".py", ".bin", ""]))
def test_any_bytes_give_a_document_or_an_input_error(data, suffix):
    """Whatever bytes a file holds, reading it gives a Document or a clean InputError, never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / f"file{suffix}", data)
        try:
            doc = read_documents([str(path)])
        except InputError as err:
            assert "\n" not in str(err)
            return
    assert doc.text.strip() and len(doc.sources) == 1


def names_in(doc: Document, folder: Path) -> list[str]:
    """The document's source names, relative to `folder`, in reading order."""
    return [Path(s.name).relative_to(folder).as_posix() for s in doc.sources]


def code_tree(root: Path) -> Path:
    """A small project: code in two folders, tests, docs and a vendored folder."""
    for rel in ["a.py", "README.md", "lib/a.py", "lib/c.py", "lib/notes.txt",
                "tests/test_a.py", "vendor/lib/v.py", "docs/guide.md"]:
        write(root / rel, f"content of {rel}\n")
    return root


def test_include_and_exclude_choose_files_of_a_folder(tmp_path):
    """Include keeps only matching files; exclude drops matching files and whole folders."""
    root = code_tree(tmp_path / "proj")
    doc = read_documents([str(root)], include=["*.py"], exclude=["tests/", "vendor"])
    assert names_in(doc, root) == ["a.py", "lib/a.py", "lib/c.py"]
    doc = read_documents([str(root)], exclude=["*.md", "lib/*.py"])
    assert names_in(doc, root) == ["a.py", "lib/notes.txt", "tests/test_a.py", "vendor/lib/v.py"]


def test_globs_match_paths_relative_to_the_folder_argument(tmp_path, monkeypatch):
    """Globs see the path below the folder given (not below the cwd); a leading / anchors there."""
    monkeypatch.chdir(tmp_path)
    code_tree(tmp_path / "proj")
    doc = read_documents(["proj"], include=["lib/*.py"])
    assert [s.name for s in doc.sources] == ["proj/lib/a.py", "proj/lib/c.py"]
    doc = read_documents(["proj"], include=["/a.py"])
    assert [s.name for s in doc.sources] == ["proj/a.py"]
    doc = read_documents(["proj"], include=["a.py"])  # no slash: the name at any depth
    assert [s.name for s in doc.sources] == ["proj/a.py", "proj/lib/a.py"]
    doc = read_documents(["proj"], include=["*.py", "!test_*"])  # the last matching glob decides
    assert [s.name for s in doc.sources] == ["proj/a.py", "proj/lib/a.py", "proj/lib/c.py",
                                             "proj/vendor/lib/v.py"]


def test_excluded_folder_is_not_entered(tmp_path):
    """A folder an exclude glob matches is pruned: a later '!' cannot re-admit a file inside it."""
    root = code_tree(tmp_path / "proj")
    doc = read_documents([str(root)], include=["*.py"], exclude=["lib/", "!lib/c.py"])
    assert names_in(doc, root) == ["a.py", "tests/test_a.py"]  # lib/ at any depth, vendor/lib too
    doc = read_documents([str(root)], include=["*.py"], exclude=["/lib/"])
    assert names_in(doc, root) == ["a.py", "tests/test_a.py", "vendor/lib/v.py"]


def test_filters_that_leave_nothing_say_so_with_counts(tmp_path):
    """When the globs remove every file of a folder, the error names the globs and the counts."""
    root = code_tree(tmp_path / "proj")
    with pytest.raises(InputError, match="has no readable text files: the include/exclude globs "
                       "left out 8 files matching no include glob; loosen the globs") as err:
        read_documents([str(root)], include=["*.rs"])
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="2 files matching an exclude glob, "
                       "4 folders matching an exclude glob"):
        read_documents([str(root)], exclude=["*.py", "*.md", "lib", "tests", "vendor", "docs/"])


DEFAULT_SKIPPED = [
    "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "Cargo.lock",
    "Gemfile.lock", "composer.lock", "uv.lock", "Pipfile.lock", "go.sum", "flake.lock",
    "app.min.js", "style.min.css", "app.js.map",
]


@pytest.mark.parametrize("name", DEFAULT_SKIPPED)
def test_lock_and_minified_files_are_skipped_in_folders_but_read_when_named(tmp_path, name):
    """A lock or minified file is skipped with a warning in a folder walk, read when named."""
    write(tmp_path / "d/app.py", "x = 1\n")
    skipped = write(tmp_path / "d" / name, "generated: line one\n")
    doc = read_documents([str(tmp_path / "d")])
    assert names_in(doc, tmp_path / "d") == ["app.py"] and "generated" not in doc.text
    (warning,) = doc.warnings
    assert "skipped 1 lock or minified file" in warning and name in warning
    assert "include glob" in warning
    assert read_documents([str(skipped)]).text.endswith("generated: line one")


def test_default_skips_give_one_summary_warning(tmp_path):
    """All lock and minified files of a folder are reported in one warning with their count."""
    write(tmp_path / "d/app.py", "x = 1\n")
    for name in DEFAULT_SKIPPED:
        write(tmp_path / "d/sub" / name, "generated\n")
    doc = read_documents([str(tmp_path / "d")])
    assert names_in(doc, tmp_path / "d") == ["app.py"]
    (warning,) = doc.warnings
    assert f"skipped {len(DEFAULT_SKIPPED)} lock or minified files" in warning
    assert warning.count(", ") == 3 and "..." in warning  # three names shown, then ...


def test_minified_rule_is_a_line_over_1000_chars_in_the_first_4_kib_of_js_or_json(tmp_path):
    """A .js/.json file is minified iff a line in its first 4 KiB exceeds 1000 characters."""
    d = tmp_path / "d"
    write(d / "bundle.js", "var a=1;" + "x" * 1000 + "\n")
    write(d / "dump.json", '{"k": "' + "v" * 1000 + '"}')
    write(d / "esm.mjs", "export const a=" + "1" * 1000 + ";\n")
    write(d / "edge.js", "a" * 1000 + "\n")  # exactly 1000: kept
    write(d / "late.json", "{\n" + '  "k": 1,\n' * 500 + '"long": "' + "v" * 2000 + '"}\n')
    write(d / "prose.txt", "word " * 400)  # long lines outside .js/.json are not sniffed
    write(d / "rows.jsonl", '{"k": "' + "v" * 2000 + '"}\n')
    doc = read_documents([str(d)])
    assert names_in(doc, d) == ["edge.js", "late.json", "prose.txt", "rows.jsonl"]
    (warning,) = doc.warnings
    assert "skipped 3 lock or minified files" in warning


def test_include_glob_overrides_a_default_skip(tmp_path):
    """A file an include glob matches is read even if it is a lock or minified file."""
    d = tmp_path / "d"
    write(d / "app.py", "x = 1\n")
    write(d / "package-lock.json", '{"lockfileVersion": 3}\n')
    write(d / "dist/app.min.js", "minified()\n")
    write(d / "data.json", '{"k": "' + "v" * 2000 + '"}')
    doc = read_documents([str(d)], include=["*.json", "dist/"])
    assert names_in(doc, d) == ["data.json", "dist/app.min.js", "package-lock.json"]
    assert doc.warnings == ()
    doc = read_documents([str(d)], include=["*.py", "yarn.lock"])  # not matched: still skipped
    assert names_in(doc, d) == ["app.py"] and doc.warnings == ()


def test_explicit_files_are_always_read(tmp_path):
    """A file named directly is read whatever the globs and default skips say."""
    d = tmp_path / "d"
    write(d / "notes.md", "Notes.\n")
    app = write(d / "app.py", "x = 1\n")
    lock = write(d / "yarn.lock", "lock data\n")
    doc = read_documents([str(app), str(d), str(lock)], include=["*.md"], exclude=["*.py"])
    assert names_in(doc, d) == ["app.py", "notes.md", "yarn.lock"]
    doc = read_documents([str(d), str(lock)])  # the walk met it first, then it was named
    assert names_in(doc, d) == ["app.py", "notes.md", "yarn.lock"] and doc.warnings == ()
    doc = read_documents([str(app)], exclude=["*"])
    assert doc.text.endswith("x = 1")


def test_folder_of_only_default_skipped_files_says_how_to_read_them(tmp_path):
    """A folder holding only lock or minified files is refused with a hint to include them."""
    write(tmp_path / "d/yarn.lock", "lock\n")
    write(tmp_path / "d/app.min.js", "min()\n")
    with pytest.raises(InputError, match="default skips left out 2 lock or minified files.*"
                       "add an include glob for the skipped files or name them directly"):
        read_documents([str(tmp_path / "d")])


@pytest.mark.parametrize("option", ["include", "exclude"])
@pytest.mark.parametrize("glob,why", [
    ("", "is empty"), ("   ", "is empty"), ("#notes", "comment"), ("[ab", r"\["),
    ("!", "negates nothing"), ("src\\", "escapes nothing"), ("./src", r"'\.' or '\.\.'"),
    ("../x/*.py", r"'\.' or '\.\.'"), ("/", "names no file"), ("a\nb", "spans lines"),
])
def test_empty_or_malformed_glob_fails(tmp_path, option, glob, why):
    """An empty or malformed glob is refused in one line that names the option, the glob and why."""
    path = write(tmp_path / "a.txt", "Alpha.")
    with pytest.raises(InputError, match=why) as err:
        read_documents([str(path)], **{option: ["*.py", glob]})
    message = str(err.value)
    assert "\n" not in message and option in message
    assert repr(glob) in message or not glob.strip()


GLOB_DIRS = ["", "d1/", "d2/", "d1/d2/"]
# Positive globs only, in the forms the oracle below understands: names, folders, anchored paths.
PROPERTY_GLOBS = ["*.py", "*.md", "a*", "*b*", "?.txt", "d1", "d2/", "/a*", "/d2", "d1/*.py",
                  "d1/d2/", "*c"]


def glob_matches(glob: str, relative: str) -> bool:
    """Gitignore semantics, by fnmatch on path parts, for the globs of PROPERTY_GLOBS."""
    parts = relative.split("/")
    dir_only = glob.endswith("/")
    pattern = glob.rstrip("/")
    if "/" in pattern:  # anchored at the folder: match a prefix of the path, part by part
        wanted = pattern.lstrip("/").split("/")
        if len(wanted) > len(parts) or (dir_only and len(wanted) == len(parts)):
            return False
        return all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))
    # unanchored: any part (a folder part matches everything inside it)
    last = len(parts) - 1
    return any(fnmatch.fnmatchcase(p, pattern) and (i < last or not dir_only)
               for i, p in enumerate(parts))


@settings(max_examples=60, deadline=None)
@given(
    files=st.sets(st.builds(str.__add__, st.sampled_from(GLOB_DIRS), st.builds(
        str.__add__, st.text(alphabet="abc", min_size=1, max_size=2),
        st.sampled_from([".py", ".txt", ".md"]))), min_size=1, max_size=8),
    include=st.lists(st.sampled_from(PROPERTY_GLOBS), max_size=3),
    exclude=st.lists(st.sampled_from(PROPERTY_GLOBS), max_size=3),
)
def test_a_file_is_read_iff_an_include_glob_matches_and_no_exclude_glob(files, include, exclude):
    """A walked file is read iff it matches an include glob (if any) and no exclude glob."""
    expected = {
        f for f in files
        if (not include or any(glob_matches(g, f) for g in include))
        and not any(glob_matches(g, f) for g in exclude)
    }
    with tempfile.TemporaryDirectory() as folder:
        for rel in files:
            write(Path(folder) / rel, f"content of {rel}\n")
        try:
            doc = read_documents([folder], include=include, exclude=exclude)
        except InputError as err:
            assert not expected and "include/exclude globs left out" in str(err)
            return
        assert set(names_in(doc, Path(folder))) == expected
