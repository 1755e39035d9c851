"""Write samples/haystack.txt: ~12K tokens of real prose for needle-in-a-haystack runs.

The text is CPython's Language Reference as shipped in `pydoc_data.topics` (Python Software
Foundation License), topics in alphabetical order from "assignment" on. Run from the
repository root:
    python scripts/make_haystack.py
"""

from pathlib import Path

from pydoc_data.topics import topics

OUTPUT = Path(__file__).resolve().parent.parent / "samples" / "haystack.txt"
CHARS = 48_000  # about 12K tokens on the embedded models' tokenizers


def haystack() -> str:
    names = sorted(topics)
    names = names[names.index("assignment") :] + names[: names.index("assignment")]
    text = "\n\n".join("\n".join(line.rstrip() for line in topics[n].strip().splitlines()) for n in names)
    cut = text.rfind(". ", 0, CHARS)
    return text[: cut + 1] + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(haystack())
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")
