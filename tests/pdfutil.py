"""A dependency-free writer of small text PDFs, for tests and for scripts/make_sample_pdf.py.

It writes raw PDF syntax: one Helvetica text line per `Tj`, WinAnsi encoding (so curly quotes
and dashes survive extraction), and a correct cross-reference table, so strict readers accept it.
The output is deterministic: the same pages always give the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

PAGE_WIDTH = 612  # US Letter, in points
PAGE_HEIGHT = 792
MARGIN = 60
FONT_SIZE = 10
LEADING = 12
LINES_PER_PAGE = (PAGE_HEIGHT - 2 * MARGIN) // LEADING


def _pdf_string(line: str) -> bytes:
    """Encode one line as a PDF literal string in WinAnsi (cp1252), escaping what PDF requires."""
    out = bytearray(b"(")
    for byte in line.encode("cp1252", errors="replace"):
        if byte in b"()\\":
            out += b"\\" + bytes([byte])
        elif 32 <= byte < 127:
            out.append(byte)
        else:
            out += b"\\%03o" % byte  # octal keeps the file plain ASCII
    out += b")"
    return bytes(out)


def _content_stream(lines: Sequence[str]) -> bytes:
    """Drawing commands for one page: text lines, or a bare rectangle when there are none."""
    if not lines:
        # a page with graphics but no text operators, like a scanned page without OCR
        return b"0.5 g 100 100 200 200 re f\n"
    parts = [b"BT /F1 %d Tf %d TL %d %d Td" % (FONT_SIZE, LEADING, MARGIN, PAGE_HEIGHT - MARGIN)]
    for line in lines:
        parts.append(_pdf_string(line) + b" Tj T*")
    parts.append(b"ET")
    return b"\n".join(parts) + b"\n"


def pdf_bytes(pages: Sequence[Sequence[str]]) -> bytes:
    """Return a valid PDF with one page per item of `pages`, each a list of text lines.

    A page given as an empty list has no text layer at all.
    """
    if not pages:
        raise ValueError("a PDF needs at least one page")
    n_pages = len(pages)
    # object numbers: 1 catalog, 2 page tree, 3 font, then (page, content) pairs
    page_ids = [4 + 2 * i for i in range(n_pages)]
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % pid for pid in page_ids), n_pages),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for pid, lines in zip(page_ids, pages):
        stream = _content_stream(lines)
        objects[pid] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>"
            % (PAGE_WIDTH, PAGE_HEIGHT, pid + 1)
        )
        objects[pid + 1] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")  # binary comment marks the file as binary
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


def paginate(lines: Sequence[str], width: int = 95) -> list[list[str]]:
    """Wrap long lines at `width` characters and split them into pages that fit LINES_PER_PAGE."""
    wrapped: list[str] = []
    for line in lines:
        while len(line) > width:
            cut = line.rfind(" ", 0, width)
            cut = cut if cut > 0 else width
            wrapped.append(line[:cut])
            line = line[cut:].lstrip(" ")
        wrapped.append(line)
    return [wrapped[i : i + LINES_PER_PAGE] for i in range(0, len(wrapped), LINES_PER_PAGE)]
