"""Reading a PDF into one part per page with text, with an actionable error when it has none."""

from __future__ import annotations

import hashlib
import io

from pypdf import PdfReader
from pypdf.errors import DependencyError, PyPdfError

from ..errors import InputError
from .document import Part
from .log import Log, one_line


def read_pdf(raw: bytes, name: str, log: Log) -> list[Part]:
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
            f"{name} is not a valid PDF ({one_line(err)}); check or re-export the file"
        ) from err

    parts: list[Part] = []
    textless: list[int] = []
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text() or ""
        except (PyPdfError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            log.warnings.append(f"{name}: cannot read the text of page {number} ({one_line(err)})")
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            parts.append(Part(name, "pdf", text, sha, page=number))
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
