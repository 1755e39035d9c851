"""Write samples/python_exceptions.pdf: the first topics of samples/python_exceptions.txt as a PDF.

A small real PDF for trying PDF ingestion, written in raw PDF syntax by tests/pdfutil.py (no extra
dependencies); the script reads it back with pypdf to check that every page's text survives.
Run from the repository root after scripts/make_sample_text.py:
    python scripts/make_sample_pdf.py
"""

import importlib.util
import io
from pathlib import Path

from pypdf import PdfReader

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "samples" / "python_exceptions.txt"
OUTPUT = ROOT / "samples" / "python_exceptions.pdf"
STOP_AT = 'The "try" statement'  # the PDF holds the title block, "Exceptions" and "raise"


def load_pdfutil():
    """Import tests/pdfutil.py by its path, so the writer has one home shared with the tests."""
    spec = importlib.util.spec_from_file_location("pdfutil", ROOT / "tests" / "pdfutil.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    pdfutil = load_pdfutil()
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    lines = lines[: lines.index(STOP_AT)]
    while lines and not lines[-1].strip():
        lines.pop()
    pages = pdfutil.paginate(lines)
    data = pdfutil.pdf_bytes(pages)

    reader = PdfReader(io.BytesIO(data), strict=True)
    if len(reader.pages) != len(pages):
        raise SystemExit(f"expected {len(pages)} pages, pypdf read {len(reader.pages)}")
    for number, (page, page_lines) in enumerate(zip(reader.pages, pages), start=1):
        extracted = page.extract_text().split()
        expected = " ".join(page_lines).split()
        if extracted != expected:
            raise SystemExit(f"page {number}: pypdf extracted different text than was written")

    OUTPUT.write_bytes(data)
    print(f"wrote {OUTPUT} ({len(pages)} pages, {len(data)} bytes); pypdf reads every page back")


if __name__ == "__main__":
    main()
