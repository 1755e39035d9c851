"""Write samples/python_exceptions.txt from the Python documentation that CPython ships.

The text comes from `pydoc_data.topics` (the Language Reference pages behind `help('try')`),
Python Software Foundation License. Run from the repository root:
    python scripts/make_sample_text.py
The topics differ a little between Python releases; the file header names the one used.
"""

import platform
from pathlib import Path

from pydoc_data.topics import topics

# a coherent reading order: what exceptions are, raising, handling, asserting, cleaning up
TOPICS = ("exceptions", "raise", "try", "assert", "with", "context-managers")
OUTPUT = Path(__file__).resolve().parent.parent / "samples" / "python_exceptions.txt"


def sample_text() -> str:
    """The title block followed by each topic (each starts with its own title line)."""
    header = (
        "Python exceptions: excerpts from The Python Language Reference\n"
        f"(CPython {platform.python_version()} documentation, from pydoc_data.topics; "
        "Python Software Foundation License)"
    )
    bodies = [
        "\n".join(line.rstrip() for line in topics[name].strip().splitlines()) for name in TOPICS
    ]
    return "\n\n".join([header] + bodies) + "\n"


if __name__ == "__main__":
    text = sample_text()
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(text.split())} words)")
