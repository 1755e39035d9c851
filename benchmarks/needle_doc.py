"""Write a document of about N model tokens of real prose with one hidden fact, for `kvcli ask`.

    python benchmarks/needle_doc.py --tokens 6000 --depth 0.5 -o /tmp/needle-6k.txt
    kvcli ask /tmp/needle-6k.txt "What is the secret passphrase for the vault?" --ratio 0.05

The prose is samples/haystack.txt (CPython's Language Reference); the fact goes at the
sentence boundary nearest `--depth`, as `kvcli eval --niah` places it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvcli.eval import niah_rows
from kvcli.models import load_model
from reuse_check import FACTS  # benchmarks/ is on sys.path when a script in it runs

NEEDLE, QUESTION, _ = FACTS[2]  # the vault passphrase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=6000, help="prompt length in model tokens")
    parser.add_argument("--depth", type=float, default=0.5, help="where the fact goes, 0 (start) to 1 (end)")
    parser.add_argument("--needle", default=NEEDLE)
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("-m", "--model", default=None, help="whose tokenizer measures the length")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    haystack = (Path(__file__).resolve().parent.parent / "samples" / "haystack.txt").read_text()
    tokenizer = load_model(args.model).tokenizer
    (row,) = niah_rows(haystack, args.needle, args.question, "-", [args.tokens], [args.depth], tokenizer)
    Path(args.output).write_text(row.context)
    print(f"wrote {args.output}; ask: {args.question}")


if __name__ == "__main__":
    main()
