"""Turn the paths a user gives (PDFs, source trees, text files, `-` for stdin) into one Document.

Ingest is text-only: it never sees tokens. It records where each file (or PDF page) sits in the
text, so that later stages can say which source a passage or a truncation came from. It only reads.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import os
import sys
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
    """One file to read: `path` is None for stdin; `folder` is the folder argument it came from."""

    path: Path | None
    name: str
    folder: str | None = None


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


def read_documents(
    paths: Sequence[str],
    stdin: TextIO | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Document:
    """Read files, folders (recursively, honouring .gitignore) and `-` (stdin) into one Document.

    `progress(done, total)` is called after each file. Raises InputError for anything the user
    has to fix: a missing path, an empty, binary, encrypted or scanned file, an empty folder.
    """
    if not paths:
        raise InputError("no input given; pass a file, a folder, or - to read stdin")
    log = _Log()
    entries, folders = _collect(paths, log)
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
            raise InputError(
                f"{folder} has no readable text files; point kvcli at text, source code or PDFs"
            )
    for folder, names in log.binary.items():
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        plural = "s" if len(names) > 1 else ""
        log.warnings.append(f"{folder}: skipped {len(names)} binary file{plural} ({shown})")
    return _assemble(parts, with_headers=len(files_with_text) > 1, warnings=log.warnings)


def _collect(paths: Sequence[str], log: _Log) -> tuple[list[_Entry], dict[str, set[Path]]]:
    """Expand the user's arguments into files to read, in order, each file at most once.

    Also returns, for each folder argument, the resolved paths of all the files found in it.
    """
    entries: list[_Entry] = []
    folders: dict[str, set[Path]] = {}
    seen: set[Path] = set()
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
            candidates = [(p, n, arg) for p, n in _walk(path, arg, log)]
            folders.setdefault(arg, set()).update(p.resolve() for p, _, _ in candidates)
        else:
            candidates = [(path, os.path.normpath(arg), None)]
        for file, name, folder in candidates:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                entries.append(_Entry(file, name, folder))
    return entries, folders


def _walk(root: Path, shown: str, log: _Log) -> Iterator[tuple[Path, str]]:
    """Files under `root` in sorted order, skipping hidden and .gitignore'd paths.

    Each .gitignore applies to its own folder and below; a deeper file overrides a shallower one.
    Symlinked folders are not followed, so links cannot make the walk loop.
    """

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
            if is_dir and not child.is_symlink():
                yield from visit(child, specs)
            elif not is_dir and child.is_file():
                yield child, os.path.normpath(os.path.join(shown, child.relative_to(root)))

    yield from visit(root, [])


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
    if entry.path is None:
        data: bytes | str = _read_stdin(stdin)
    else:
        if entry.path.suffix.lower() in BINARY_EXTENSIONS:
            return _binary(entry, log)
        data = _read_file(entry)
        if data is None:
            return _binary(entry, log)

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
