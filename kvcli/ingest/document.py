"""The Document that ingest returns, and how the parts read from files are joined into one."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Source:
    """Where one file, PDF page or stdin sits in `Document.text`: the span [start, end)."""

    name: str  # the path as the user wrote it (joined with the path inside a folder), or <stdin>
    kind: str  # 'pdf' | 'code' | 'text' | 'stdin'
    start: int  # inclusive; the span includes the source's header line, if it has one
    end: int  # exclusive
    page: int | None  # 1-based PDF page number, else None
    sha256: str  # of the raw bytes of the file (for PDF pages: of the whole PDF)
    encoding: str | None = None  # the encoding the file was read in when it was not UTF-8 (detected)


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

    @property
    def encodings(self) -> dict[str, str]:
        """{source name: encoding} for the sources that were not UTF-8, read in a detected encoding."""
        return {source.name: source.encoding for source in self.sources if source.encoding}

    def label(self, source: Source) -> str:
        """A short human name for a source: 'report.pdf p.3' or 'src/app.py'."""
        return f"{source.name} p.{source.page}" if source.page is not None else source.name


@dataclass
class Part:
    """The text of one future Source, before offsets are known."""

    name: str
    kind: str
    body: str
    sha256: str
    page: int | None = None
    encoding: str | None = None


def assemble(parts: list[Part], with_headers: bool, warnings: list[str]) -> Document:
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
        sources.append(Source(part.name, part.kind, offset, end, part.page, part.sha256, part.encoding))
        offset = end
    text = "".join(chunks)
    if not text.strip():
        raise InputError("the input is empty; give kvcli a file with some text")
    return Document(text, tuple(sources), tuple(warnings))
