"""Turn the paths a user gives (PDFs, source trees, text files, `-` for stdin) into one Document.

Ingest is text-only: it never sees tokens. It records where each file (or PDF page) sits in the
text, so that later stages can say which source a passage or a truncation came from. It only reads.

Which files a folder walk reads. A folder is walked recursively in sorted order; hidden paths
(a leading '.'), paths a .gitignore ignores, and symlinked folders are always left out. The
`include` and `exclude` globs then follow .gitignore rules and are matched against each path
relative to the folder argument ('src/a.py' is 'a.py' when the user gave 'src'), so a glob without a
slash ('*.py', 'test_*') matches a name at any depth, a leading '/' anchors it to the folder, a
trailing '/' matches only folders, a matching folder matches everything inside it, and within one
option a later '!glob' re-admits what an earlier glob matched. With include globs, only files they
match are read; a file or folder an exclude glob matches is dropped (an excluded folder is not
entered), even if an include glob matches it. By default a walk also skips two kinds of generated
files, reporting them in one warning per folder: lock files (package-lock.json, yarn.lock,
pnpm-lock.yaml, poetry.lock, Cargo.lock, Gemfile.lock, composer.lock, uv.lock, Pipfile.lock, go.sum
and any *.lock) and minified files (*.min.js, *.min.css, *.map, and any .js, .mjs, .cjs or .json
file with a line of more than 1000 characters in its first 4 KiB, which hand-written code and
config rarely have). An include glob that matches such a file reads it after all. A path given
directly (not found by a walk) is always read: no glob and no default skip applies to it.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pathspec
from pypdf import PdfReader
from pypdf.errors import DependencyError, PyPdfError

from kvcli.errors import InputError

logger = logging.getLogger(__name__)

STDIN_NAME = "<stdin>"
BINARY_SNIFF_BYTES = 8192  # a NUL byte in this prefix marks a file as binary, as git does
# a .js or .json file with a line longer than MINIFIED_LINE_CHARS in this prefix is minified
MINIFIED_SNIFF_BYTES = 4096
MINIFIED_LINE_CHARS = 1000

CODE_EXTENSIONS = frozenset(
    ".py .pyi .pyx .ipynb .js .mjs .cjs .jsx .ts .tsx .vue .svelte .go .rs .c .h .cc .cpp .cxx "
    ".hpp .hh .hxx .cu .cuh .m .mm .java .kt .kts .scala .groovy .gradle .cs .fs .swift .dart "
    ".rb .php .pl .pm .lua .r .jl .ex .exs .erl .hs .ml .mli .clj .elm .zig .nim .sh .bash .zsh "
    ".fish .ps1 .bat .cmd .sql .proto .graphql .tf .cmake .mk .toml .yaml .yml .json .jsonl "
    ".xml .html .htm .css .scss .sass .less .ini .cfg .conf .env .lock".split()
)
TEXT_EXTENSIONS = frozenset(
    ".txt .text .md .markdown .rst .adoc .org .tex .bib .csv .tsv .log".split()
)
CODE_FILENAMES = frozenset(
    "Makefile GNUmakefile Dockerfile Containerfile Justfile Rakefile Gemfile Procfile "
    "Vagrantfile CMakeLists.txt BUILD WORKSPACE".split()
)
BINARY_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .gif .bmp .ico .icns .webp .tif .tiff .psd .heic .zip .gz .tgz .bz2 .xz "
    ".zst .7z .rar .tar .jar .war .whl .egg .exe .dll .so .dylib .o .a .lib .obj .pyc .pyo "
    ".pyd .class .wasm .bin .dat .pt .pth .ckpt .safetensors .gguf .onnx .npy .npz .pkl "
    ".pickle .h5 .hdf5 .parquet .arrow .db .sqlite .sqlite3 .mp3 .mp4 .m4a .wav .flac .ogg "
    ".mov .avi .mkv .webm .woff .woff2 .ttf .otf .eot .doc .docx .xls .xlsx .ppt .pptx .odt "
    ".ods .odp .epub .iso .dmg".split()
)
LOCK_FILENAMES = frozenset(
    "package-lock.json yarn.lock pnpm-lock.yaml poetry.lock Cargo.lock Gemfile.lock "
    "composer.lock uv.lock Pipfile.lock go.sum".split()
)
MINIFIED_SUFFIXES = (".min.js", ".min.css", ".map")
MINIFIED_SNIFF_EXTENSIONS = frozenset(".js .mjs .cjs .json".split())


@dataclass(frozen=True)
class Source:
    """Where one file, PDF page or stdin sits in `Document.text`: the span [start, end)."""

    name: str  # the path as the user wrote it (joined with the path inside a folder), or <stdin>
    kind: str  # 'pdf' | 'code' | 'text' | 'stdin'
    start: int  # inclusive; the span includes the source's header line, if it has one
    end: int  # exclusive
    page: int | None  # 1-based PDF page number, else None
    sha256: str  # of the raw bytes of the file (for PDF pages: of the whole PDF)


@dataclass(frozen=True)
class Document:
    """All input text in reading order, with the span of every source and warnings for the user."""

    text: str
    sources: tuple[Source, ...]
    warnings: tuple[str, ...] = ()

    def source_at(self, char_offset: int) -> Source | None:
        """The source whose span contains `char_offset`, or None (e.g. a separator between two)."""
        i = bisect.bisect_right(self.sources, char_offset, key=lambda s: s.start) - 1
        if i >= 0 and char_offset < self.sources[i].end:
            return self.sources[i]
        return None

    def label(self, source: Source) -> str:
        """A short human name for a source: 'report.pdf p.3' or 'src/app.py'."""
        return f"{source.name} p.{source.page}" if source.page is not None else source.name


@dataclass
class _Entry:
    """One file to read: `path` is None for stdin; `folder` is the folder argument it came from.

    `wanted` is set when the user asked for the file (an include glob matched it, or it was also
    named directly), which lifts the default skip of lock and minified files.
    """

    path: Path | None
    name: str
    folder: str | None = None
    wanted: bool = False


@dataclass(frozen=True)
class _Filters:
    """The compiled include and exclude globs; None where the user gave none."""

    include: pathspec.GitIgnoreSpec | None = None
    exclude: pathspec.GitIgnoreSpec | None = None


@dataclass
class _Part:
    """The text of one future Source, before offsets are known."""

    name: str
    kind: str
    body: str
    sha256: str
    page: int | None = None


@dataclass
class _Log:
    """Warnings, and what was skipped per folder argument, gathered while reading."""

    warnings: list[str] = field(default_factory=list)
    binary: dict[str, list[str]] = field(default_factory=dict)
    generated: dict[str, list[str]] = field(default_factory=dict)  # lock and minified files
    # per folder argument: 'unmatched' files, 'excluded' files, 'excluded_folders'
    filtered: dict[str, Counter[str]] = field(default_factory=dict)


def read_documents(
    paths: Sequence[str],
    stdin: TextIO | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Document:
    """Read files, folders (recursively, honouring .gitignore) and `-` (stdin) into one Document.

    `include` and `exclude` are gitignore-style globs that choose which files of a folder are read
    (see the module docstring for the rules); files named directly are always read.
    `progress(done, total)` is called after each file. Raises InputError for anything the user
    has to fix: a missing path, an empty, binary, encrypted or scanned file, an empty folder,
    an empty or malformed glob.
    """
    filters = _Filters(_compile(include, "include"), _compile(exclude, "exclude"))
    if not paths:
        raise InputError("no input given; pass a file, a folder, or - to read stdin")
    log = _Log()
    entries, folders = _collect(paths, log, filters)
    parts: list[_Part] = []
    files_with_text: set[Path | None] = set()  # resolved paths; None stands for stdin
    for done, entry in enumerate(entries, start=1):
        new_parts = _read_entry(entry, stdin if stdin is not None else sys.stdin, log)
        if new_parts:
            parts.extend(new_parts)
            files_with_text.add(entry.path.resolve() if entry.path is not None else None)
        if progress is not None:
            progress(done, len(entries))

    for folder, files in folders.items():
        if not files & files_with_text:
            raise _no_readable_files(folder, log)
    for folder, names in log.binary.items():
        log.warnings.append(f"{folder}: skipped {_files(names, 'binary')} ({_some(names)})")
    for folder, names in log.generated.items():
        log.warnings.append(
            f"{folder}: skipped {_files(names, 'lock or minified')} ({_some(names)}); "
            "add an include glob that matches them to read them"
        )
    return _assemble(parts, with_headers=len(files_with_text) > 1, warnings=log.warnings)


def _count(n: int, noun: str) -> str:
    """'1 file' or '3 files'."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _files(names: Sequence[str], what: str) -> str:
    """'1 binary file' or '3 binary files'."""
    return f"{len(names)} {what} file{'s' if len(names) != 1 else ''}"


def _some(names: Sequence[str]) -> str:
    """The first three names, then '...' if there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _no_readable_files(folder: str, log: _Log) -> InputError:
    """The error for a folder argument that gave no text, naming what globs and skips removed."""
    filtered = log.filtered.get(folder, Counter())
    removed = [
        _count(filtered[key], noun) + " " + what
        for key, noun, what in (
            ("unmatched", "file", "matching no include glob"),
            ("excluded", "file", "matching an exclude glob"),
            ("excluded_folders", "folder", "matching an exclude glob"),
        )
        if filtered[key]
    ]
    generated = log.generated.get(folder, [])
    if not removed and not generated:
        return InputError(
            f"{folder} has no readable text files; point kvcli at text, source code or PDFs"
        )
    reasons, fixes = [], []
    if removed:
        reasons.append(f"the include/exclude globs left out {', '.join(removed)}")
        fixes.append("loosen the globs")
    if generated:
        skipped = f"{_files(generated, 'lock or minified')} ({_some(generated)})"
        reasons.append(f"the default skips left out {skipped}")
        fixes.append("add an include glob for the skipped files or name them directly")
    return InputError(
        f"{folder} has no readable text files: {'; '.join(reasons)}; {' or '.join(fixes)}"
    )


def _compile(globs: Sequence[str], option: str) -> pathspec.GitIgnoreSpec | None:
    """The globs of one option as one gitignore spec (None if there are none), each checked first.

    Each glob must mean something on its own: gitignore silently treats a blank line, a '#'
    comment or an unclosed '[' as no pattern at all, which here would hide a typo.
    """
    if isinstance(globs, str):
        raise TypeError(f"{option} must be a sequence of globs, not one string")
    example = "e.g. '*.py', 'docs/' or 'src/**/*.ts'"
    for glob in globs:
        if not glob.strip():
            raise InputError(f"an {option} glob is empty; remove it or give a pattern, {example}")
        if "\n" in glob or "\r" in glob:
            raise InputError(f"{option} glob {glob!r} spans lines; give each glob separately")
        if {".", ".."} & set(glob.removeprefix("!").split("/")):
            raise InputError(
                f"{option} glob {glob!r} has a '.' or '..' part, which never matches: globs are "
                "matched relative to the folder, so drop the ./ or ../"
            )
        try:
            patterns = pathspec.GitIgnoreSpec.from_lines([glob]).patterns
        except ValueError as err:  # pathspec's GitIgnorePatternError
            if glob.endswith("\\"):
                why = "a trailing \\ escapes nothing"
            elif glob.strip() == "!":
                why = "a lone ! negates nothing"
            else:
                why = _one_line(err)
            message = f"{option} glob {glob!r} is malformed ({why}); fix it, {example}"
            raise InputError(message) from err
        if patterns[0].include is None:
            if glob.lstrip().startswith("#"):
                why = "a leading # makes it a comment; write \\# for a literal #"
            elif "[" in glob:
                why = "a [ without its ] makes it invalid"
            else:
                why = "it names no file or folder"
            raise InputError(f"{option} glob {glob!r} matches nothing ({why}); fix it, {example}")
    return pathspec.GitIgnoreSpec.from_lines(list(globs)) if globs else None


def _collect(
    paths: Sequence[str], log: _Log, filters: _Filters
) -> tuple[list[_Entry], dict[str, set[Path]]]:
    """Expand the user's arguments into files to read, in order, each file at most once.

    Also returns, for each folder argument, the resolved paths of all the files found in it.
    """
    entries: list[_Entry] = []
    folders: dict[str, set[Path]] = {}
    seen: dict[Path, _Entry] = {}
    stdin_seen = False
    for arg in paths:
        if arg == "-":
            if stdin_seen:
                raise InputError("- (stdin) is given more than once; pass it once")
            stdin_seen = True
            entries.append(_Entry(None, STDIN_NAME))
            continue
        path = Path(arg)
        if not path.exists():
            raise InputError(f"{arg} does not exist; check the path")
        if path.is_dir():
            walked = _walk(path, arg, log, filters)
            candidates = [_Entry(file, name, arg, wanted) for file, name, wanted in walked]
            folders.setdefault(arg, set()).update(e.path.resolve() for e in candidates)
        else:
            candidates = [_Entry(path, os.path.normpath(arg))]
        for entry in candidates:
            key = entry.path.resolve()
            if key not in seen:
                seen[key] = entry
                entries.append(entry)
            elif entry.folder is None:
                seen[key].wanted = True  # named directly after a folder walk found it: always read
    return entries, folders


def _walk(
    root: Path, shown: str, log: _Log, filters: _Filters
) -> Iterator[tuple[Path, str, bool]]:
    """(path, name, wanted) for files under `root` in sorted order, filtered as the module says.

    Each .gitignore applies to its own folder and below; a deeper file overrides a shallower one.
    Symlinked folders are not followed, so links cannot make the walk loop. `wanted` is True
    when an include glob matched the file.
    """
    filtered: Counter[str] = Counter()

    def visit(folder: Path, specs: list[tuple[Path, pathspec.GitIgnoreSpec]]):
        try:
            gitignore = folder / ".gitignore"
            if gitignore.is_file():
                lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines()
                specs = specs + [(folder, pathspec.GitIgnoreSpec.from_lines(lines))]
            children = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as err:
            log.warnings.append(f"skipped folder {folder}: {err.strerror or err}")
            return
        for child in children:
            if child.name.startswith("."):
                continue
            is_dir = child.is_dir()
            if _ignored(child, is_dir, specs):
                logger.debug("ignored by .gitignore: %s", child)
                continue
            # include/exclude globs see the path below the folder argument, not below a .gitignore
            relative = child.relative_to(root).as_posix() + ("/" if is_dir else "")
            if is_dir and not child.is_symlink():
                if filters.exclude is not None and filters.exclude.match_file(relative):
                    filtered["excluded_folders"] += 1
                    continue
                yield from visit(child, specs)
            elif not is_dir and child.is_file():
                # an include glob is checked first, so a file both globs reject counts as unmatched
                if filters.include is not None and not filters.include.match_file(relative):
                    filtered["unmatched"] += 1
                    continue
                if filters.exclude is not None and filters.exclude.match_file(relative):
                    filtered["excluded"] += 1
                    continue
                name = os.path.normpath(os.path.join(shown, relative))
                yield child, name, filters.include is not None

    yield from visit(root, [])
    if filtered:
        log.filtered[shown] = filtered  # a folder given twice is walked the same way twice


def _ignored(path: Path, is_dir: bool, specs: list[tuple[Path, pathspec.GitIgnoreSpec]]) -> bool:
    """Whether the deepest .gitignore with a matching pattern ignores `path`."""
    for base, spec in reversed(specs):
        relative = path.relative_to(base).as_posix() + ("/" if is_dir else "")
        result = spec.check_file(relative)
        if result.include is not None:
            return bool(result.include)
    return False


def _read_entry(entry: _Entry, stdin: TextIO, log: _Log) -> list[_Part]:
    """The parts of one file or stdin; [] when a file inside a folder is skipped."""
    explicit = entry.folder is None
    skip_generated = not explicit and not entry.wanted
    if entry.path is None:
        data: bytes | str = _read_stdin(stdin)
    else:
        if entry.path.suffix.lower() in BINARY_EXTENSIONS:
            return _binary(entry, log)
        if skip_generated and _generated_name(entry.path.name):
            return _generated(entry, log)  # lock files can be large: skipped without reading
        data = _read_file(entry)
        if data is None:
            return _binary(entry, log)
        if skip_generated and _minified(entry.path, data):
            return _generated(entry, log)

    if isinstance(data, str):  # a text stream without a byte buffer (e.g. io.StringIO)
        raw = data.encode("utf-8", errors="surrogatepass")
        text = data
    else:
        raw = data
        named_pdf = entry.path is not None and entry.path.suffix.lower() == ".pdf"
        if raw.startswith(b"%PDF-") or named_pdf:
            try:
                return _read_pdf(raw, entry.name, log)
            except InputError as err:
                if explicit:
                    raise
                log.warnings.append(f"skipped: {err}")
                return []
        if b"\0" in raw[:BINARY_SNIFF_BYTES]:  # stdin is not sniffed by _read_file
            return _binary(entry, log)
        text = _decode(raw, entry.name, log)

    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        if explicit:
            what = "stdin" if entry.path is None else entry.name
            raise InputError(f"{what} is empty; give it some text")
        logger.debug("skipped empty file %s", entry.name)
        return []
    kind = "stdin" if entry.path is None else _kind(entry.path)
    return [_Part(entry.name, kind, text, hashlib.sha256(raw).hexdigest())]


def _read_stdin(stdin: TextIO) -> bytes | str:
    """Raw bytes when the stream has a byte buffer (so PDFs and bad UTF-8 work), else text."""
    buffer = getattr(stdin, "buffer", None)
    return buffer.read() if buffer is not None else stdin.read()


def _read_file(entry: _Entry) -> bytes | None:
    """The file's bytes, or None when it is binary; only the first 8 KB of a binary file is read."""
    try:
        with open(entry.path, "rb") as handle:
            head = handle.read(BINARY_SNIFF_BYTES)
            if b"\0" in head and not head.startswith(b"%PDF-"):
                return None
            return head + handle.read()
    except OSError as err:
        reason = err.strerror or err
        raise InputError(f"cannot read {entry.name}: {reason}; check its permissions") from err


def _binary(entry: _Entry, log: _Log) -> list[_Part]:
    """Refuse a binary file the user named; note one found in a folder for a summary warning."""
    if entry.folder is None:
        raise InputError(
            f"{entry.name} looks like a binary file; give kvcli text, source code or a PDF "
            "(convert other formats to one of those first)"
        )
    logger.debug("skipped binary file %s", entry.name)
    log.binary.setdefault(entry.folder, []).append(entry.name)
    return []


def _generated_name(name: str) -> bool:
    """Whether a file name marks a lock file or a minified bundle or source map."""
    lower = name.lower()
    return name in LOCK_FILENAMES or lower.endswith(".lock") or lower.endswith(MINIFIED_SUFFIXES)


def _minified(path: Path, raw: bytes) -> bool:
    """Whether a .js or .json file has a line too long for a person to have written it.

    Only the first 4 KiB are looked at, so one long string late in a hand-written file does not
    count; a minified bundle or a generated JSON dump starts with such a line.
    """
    if path.suffix.lower() not in MINIFIED_SNIFF_EXTENSIONS:
        return False
    head = raw[:MINIFIED_SNIFF_BYTES].decode("utf-8", errors="replace")
    lines = head.replace("\r", "\n").split("\n")
    return max(len(line) for line in lines) > MINIFIED_LINE_CHARS


def _generated(entry: _Entry, log: _Log) -> list[_Part]:
    """Note a lock or minified file found in a folder for a summary warning."""
    logger.debug("skipped lock or minified file %s", entry.name)
    log.generated.setdefault(entry.folder, []).append(entry.name)
    return []


def _decode(raw: bytes, name: str, log: _Log) -> str:
    """UTF-8 (a leading BOM dropped); invalid bytes become U+FFFD with a warning naming the file."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warnings.append(
            f"{name} is not valid UTF-8; undecodable bytes were replaced with '\ufffd' "
            "(convert it to UTF-8 for exact text)"
        )
        return raw.decode("utf-8-sig", errors="replace")


def _kind(path: Path) -> str:
    """'code' or 'text', from the file name; unknown extensions that hold text count as text."""
    if path.name in CODE_FILENAMES or path.suffix.lower() in CODE_EXTENSIONS:
        return "code"
    return "text"


def _read_pdf(raw: bytes, name: str, log: _Log) -> list[_Part]:
    """One part per PDF page with text; InputError for invalid, encrypted or text-less PDFs."""
    if b"%PDF-" not in raw[:1024]:
        raise InputError(f"{name} is not a valid PDF (no %PDF header); check the file or rename it")
    sha = hashlib.sha256(raw).hexdigest()
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InputError(
                f"{name} is encrypted; decrypt it first, "
                f"e.g. qpdf --password=PASSWORD --decrypt {name} decrypted.pdf"
            )
        pages = list(reader.pages)
    except DependencyError as err:
        # pypdf needs the `cryptography` package for AES-encrypted files, even without a password
        raise InputError(
            f"{name} is encrypted with AES; pip install cryptography, "
            "or decrypt it first with qpdf --decrypt"
        ) from err
    except (PyPdfError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise InputError(
            f"{name} is not a valid PDF ({_one_line(err)}); check or re-export the file"
        ) from err

    parts: list[_Part] = []
    textless: list[int] = []
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text() or ""
        except (PyPdfError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            log.warnings.append(f"{name}: cannot read the text of page {number} ({_one_line(err)})")
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            parts.append(_Part(name, "pdf", text, sha, page=number))
        else:
            textless.append(number)
    if not parts:
        raise InputError(
            f"{name} has no text layer (it looks scanned); "
            f"run OCR on it first, e.g. ocrmypdf {name} ocr.pdf"
        )
    if textless:
        listed = ", ".join(map(str, textless))
        log.warnings.append(
            f"{name}: pages {listed} have no extractable text (scanned?) and were left out"
        )
    return parts


def _one_line(err: Exception) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(err).split()) or type(err).__name__


def _assemble(parts: list[_Part], with_headers: bool, warnings: list[str]) -> Document:
    """Join parts with blank lines, each under its header where needed, and record the spans."""
    chunks: list[str] = []
    sources: list[Source] = []
    offset = 0
    for part in parts:
        if part.page is not None:
            header = f"--- {part.name}, page {part.page} ---\n"
        elif with_headers or part.kind == "code":
            header = f"=== {part.name} ===\n"
        else:
            header = ""
        if chunks:
            chunks.append("\n\n")
            offset += 2
        chunk = header + part.body.rstrip()
        chunks.append(chunk)
        end = offset + len(chunk)
        sources.append(Source(part.name, part.kind, offset, end, part.page, part.sha256))
        offset = end
    text = "".join(chunks)
    if not text.strip():
        raise InputError("the input is empty; give kvcli a file with some text")
    return Document(text, tuple(sources), tuple(warnings))
