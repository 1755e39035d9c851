"""Reading one file or stdin into parts: binary sniffing, the default skips, decoding, its kind."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import InputError
from .document import Part
from .encoding import damaged_utf8, detect
from .log import Log
from .pdf import read_pdf

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


@dataclass
class Entry:
    """One file to read: `path` is None for stdin; `folder` is the folder argument it came from.

    `wanted` is set when the user asked for the file (an include glob matched it, or it was also
    named directly), which lifts the default skip of lock and minified files.
    """

    path: Path | None
    name: str
    folder: str | None = None
    wanted: bool = False


def read_entry(entry: Entry, stdin: TextIO, log: Log) -> list[Part]:
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
        text, encoding = data, None
    else:
        raw = data
        named_pdf = entry.path is not None and entry.path.suffix.lower() == ".pdf"
        if raw.startswith(b"%PDF-") or named_pdf:
            try:
                return read_pdf(raw, entry.name, log)
            except InputError as err:
                if explicit:
                    raise
                log.warnings.append(f"skipped: {err}")
                return []
        if b"\0" in raw[:BINARY_SNIFF_BYTES]:  # stdin is not sniffed by _read_file
            return _binary(entry, log)
        text, encoding = _decode(raw, entry.name, log)

    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        if explicit:
            what = "stdin" if entry.path is None else entry.name
            raise InputError(f"{what} is empty; give it some text")
        logger.debug("skipped empty file %s", entry.name)
        return []
    kind = "stdin" if entry.path is None else _kind(entry.path)
    return [Part(entry.name, kind, text, hashlib.sha256(raw).hexdigest(), encoding=encoding)]


def _read_stdin(stdin: TextIO) -> bytes | str:
    """Raw bytes when the stream has a byte buffer (so PDFs and bad UTF-8 work), else text."""
    buffer = getattr(stdin, "buffer", None)
    return buffer.read() if buffer is not None else stdin.read()


def _read_file(entry: Entry) -> bytes | None:
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


def _binary(entry: Entry, log: Log) -> list[Part]:
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


def _generated(entry: Entry, log: Log) -> list[Part]:
    """Note a lock or minified file found in a folder for a summary warning."""
    logger.debug("skipped lock or minified file %s", entry.name)
    log.generated.setdefault(entry.folder, []).append(entry.name)
    return []


def _decode(raw: bytes, name: str, log: Log) -> tuple[str, str | None]:
    """(text, encoding): UTF-8 (a leading BOM dropped; encoding None), else the encoding detected,
    named in a warning; else UTF-8 with invalid bytes as U+FFFD, with a warning naming the file."""
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    found = None if damaged_utf8(raw) else detect(raw)
    if found is not None:
        text, encoding = found
        log.warnings.append(
            f"{name} is not UTF-8: read as {encoding}, the encoding it most likely is; if characters look wrong, "
            f"convert it to UTF-8 (iconv -f {encoding.upper().replace('_', '-')} -t UTF-8)"
        )
        return text, encoding
    log.warnings.append(
        f"{name} is not valid UTF-8; undecodable bytes were replaced with '\ufffd' "
        "(convert it to UTF-8 for exact text)"
    )
    return raw.decode("utf-8-sig", errors="replace"), None


def _kind(path: Path) -> str:
    """'code' or 'text', from the file name; unknown extensions that hold text count as text."""
    if path.name in CODE_FILENAMES or path.suffix.lower() in CODE_EXTENSIONS:
        return "code"
    return "text"
