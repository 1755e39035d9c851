"""Bytes that are not UTF-8 read in the encoding they were most likely written in.

charset-normalizer ranks the candidates by how much the text each gives looks like a mess;
on short Western European text several code pages tie (cp1250 and cp1257 read 'Zürich' as cleanly
as cp1252 does), so the common legacy encodings are tried first, and cp1252, the most common of
them, wins a tie or where the guess mixes alphabets within words.
"""

from __future__ import annotations

import unicodedata

# The encodings legacy text is usually in, tried before charset-normalizer's full list: Windows'
# code pages for Western, Central European, Cyrillic, Greek, Turkish, Hebrew and Arabic text,
# KOI8-R, and the Japanese, Chinese and Korean ones.
COMMON = ("cp1252", "cp1250", "cp1251", "cp1253", "cp1254", "cp1255", "cp1256", "koi8_r",
          "cp932", "euc_jp", "gb18030", "big5", "euc_kr")
WESTERN = "cp1252"
# UTF-16 and UTF-32 files hold NUL bytes and are refused as binary before decoding; without a
# BOM, a guess of them for 8-bit text is always wrong.
WIDE = ["utf_16", "utf_16_be", "utf_16_le", "utf_32", "utf_32_be", "utf_32_le", "utf_7"]


def damaged_utf8(raw: bytes) -> bool:
    """Whether bytes that fail to decode are UTF-8 with a few bad bytes (a download cut mid-character,
    one stray Latin-1 byte, a BOM) rather than text in another encoding: detecting a code page for
    such a file would turn every accented letter into mojibake, where replacing the bad bytes
    loses one character each. Text in a legacy code page almost never forms UTF-8 sequences."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return True
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    well_formed = sum(1 for ch in text if ord(ch) > 127) - bad
    return well_formed > bad


def detect(raw: bytes) -> tuple[str, str] | None:
    """(text, encoding) for bytes that are not UTF-8, or None when no encoding reads them cleanly."""
    from charset_normalizer import from_bytes

    # a looser threshold than the default 0.2: short text heavy in accents ('déjà déjà') reads as mess
    matches = from_bytes(raw, cp_isolation=list(COMMON), threshold=0.5)
    if not matches:
        matches = from_bytes(raw, cp_exclusion=WIDE)
    best = matches.best()
    if best is None:
        return None
    text = str(best)
    if WESTERN not in best.could_be_from_charset:
        try:
            western = raw.decode(WESTERN)
        except UnicodeDecodeError:  # five bytes are not in cp1252
            return text, best.encoding
        tied = any(WESTERN in match.could_be_from_charset and match.chaos <= best.chaos for match in matches)
        if not tied and mixed_words(text) <= mixed_words(western):
            return text, best.encoding
        text = western
    return text, WESTERN


# Alphabets that never share a word with Latin letters in real text; a wrong code page for short
# Western text makes such words ('café' read as cp1251 is 'cafй'), which charset-normalizer's
# measure of mess misses.
NOT_LATIN = {"CYRILLIC", "GREEK", "HEBREW", "ARABIC"}


def mixed_words(text: str) -> int:
    """How many words mix Latin letters with Cyrillic, Greek, Hebrew or Arabic ones."""
    count = 0
    for word in text.split():
        scripts = {unicodedata.name(char, "").partition(" ")[0] for char in word if char.isalpha()}
        count += "LATIN" in scripts and not scripts.isdisjoint(NOT_LATIN)
    return count
