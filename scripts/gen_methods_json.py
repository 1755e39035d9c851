"""Write kvcli/data/methods.json, what `kvcli methods` lists, from the method classes.

Usage: python scripts/gen_methods_json.py           (rewrite kvcli/data/methods.json)
       python scripts/gen_methods_json.py --stdout  (print it instead; tests/test_startup.py compares)

`kvcli methods` reads the file instead of importing the methods, whose modules import torch:
run this after adding a method or changing a knob, a summary or a paper.
"""

from __future__ import annotations

import json
import sys

from kvcli.cli.info import METHODS_FILE, method_rows
from kvcli.methods import DEFAULT_METHOD, REGISTRY


def text() -> str:
    return json.dumps(method_rows(REGISTRY, DEFAULT_METHOD), indent=2) + "\n"


if __name__ == "__main__":
    if "--stdout" in sys.argv:
        sys.stdout.write(text())
    else:
        METHODS_FILE.write_text(text(), encoding="utf-8")
