"""Is a fact lost to chunked reading or to re-indexed positions? One document with one fact at a
depth, asked as `kvcli ask` with each set of flags given (one process per run, as a user types it).

    python benchmarks/chunk_budget.py --length 8000 --depth 0.5 \\
        --runs "--budget 128" "--budget 128 --chunk-size 1024" "--budget 512 --chunk-size 1024" "--budget 128 --max-context 1536"

The document is real prose (`pydoc_data.topics`) with the archive-room fact inserted at `--depth`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reuse_check import FACTS, build_document, kvcli, load_tokenizer, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--runs", nargs="+", required=True, help="one quoted set of kvcli ask flags per run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    fact, question, expected = FACTS[0]
    text = build_document(load_tokenizer(args.model), args.length, [])
    at = text.rfind(". ", 0, int(len(text) * args.depth))
    text = text[: at + 2] + fact + " " + text[at + 2 :]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "doc.txt"
        doc.write_text(text, encoding="utf-8")
        for flags in args.runs:
            model = ["-m", args.model] if args.model else []
            seconds, (line,) = kvcli("ask", str(doc), question, "--max-new-tokens", "24", *model, *shlex.split(flags))
            stats = line["stats"]
            row = {"flags": flags, "found": expected in line["answer"].lower(), "read": stats["read"],
                   "prompt_tokens": stats["prompt_tokens"], "chunks": (stats["extra"].get("past_window") or {}).get("chunks") or len(stats["extra"].get("chunks", [])) or 1,
                   "seconds": round(seconds, 1), "answer": line["answer"]}
            rows.append(row)
            print(f"{flags}: found={row['found']} ({row['read']}, {row['chunks']} chunks, {row['seconds']} s)", file=sys.stderr, flush=True)
    write_result({"model": args.model or "default", "length": args.length, "depth": args.depth, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
