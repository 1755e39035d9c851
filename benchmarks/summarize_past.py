"""`kvcli summarize` on documents longer than the model's positions: by sections (map-reduce,
`--past sections`) against one compressed re-indexed read (`--past compressed`), scored by
ROUGE-L against reference summaries, with the one-pass summary from a context that holds the
whole document as the reference point. Every run is a `kvcli summarize` process.

    python benchmarks/summarize_past.py --data ../shared/data/longbench_multi_news.jsonl --rows 4 --max-context 1024 --json summarize-past.json

`--data` is a JSONL file with `context` and `answers` (LongBench's layout: multi_news's
`NEWLINE_CHAR` is turned back into line breaks); rows are taken in file order among those
whose length (LongBench's `length`, words) is between --min-words and --max-words.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reuse_check import kvcli, write_result  # noqa: E402

from kvcli.eval.metrics import rouge_l  # noqa: E402

HOW = {
    "sections": ["--past", "sections"],
    "compressed": ["--past", "compressed"],
    "one pass": [],  # the context holds the whole document: the reference point
}


def summarize(doc: Path, args, how: str) -> dict:
    model = ["-m", args.model] if args.model else []
    fit = [] if how == "one pass" else ["--max-context", str(args.max_context)]
    seconds, (line,) = kvcli("summarize", str(doc), "--method", args.method, "--ratio", str(args.ratio), "--length", args.length,
                             "--max-new-tokens", str(args.max_new_tokens), *model, *fit, *HOW[how])
    stats = line["stats"]
    past = stats["extra"].get("past_window") or {}
    return {"how": how, "seconds": round(seconds, 1), "read": stats["read"], "sections": past.get("sections"),
            "chunks": past.get("chunks"), "summary": line["answer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--min-words", type=int, default=2000)
    parser.add_argument("--max-words", type=int, default=3000)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--method", default="evidencekv")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--length", default="medium")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--json", default=None)
    parser.add_argument("--hows", default=",".join(HOW), help=f"which ways to summarize, comma-separated (default {','.join(HOW)})")
    args = parser.parse_args()
    hows = [how for how in HOW if how in args.hows.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if args.min_words <= r.get("length", 0) <= args.max_words][: args.rows]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows):
            doc = Path(tmp) / f"row-{i}.txt"
            doc.write_text(row["context"].replace("NEWLINE_CHAR", "\n"), encoding="utf-8")
            for how in hows:
                result = {"row": row.get("_id", i), "words": row.get("length"), **summarize(doc, args, how)}
                result["rouge_l"] = round(rouge_l(result["summary"], row["answers"]), 4)
                results.append(result)
                print(f"row {i} {how}: rouge-l {result['rouge_l']} ({result['seconds']} s)", file=sys.stderr, flush=True)
    mean = {how: round(sum(r["rouge_l"] for r in results if r["how"] == how) / max(1, len(rows)), 4) for how in hows}
    seconds = {how: round(sum(r["seconds"] for r in results if r["how"] == how) / max(1, len(rows)), 1) for how in hows}
    write_result({"model": args.model or "default", "method": args.method, "ratio": args.ratio, "max_context": args.max_context,
                  "rows": len(rows), "mean_rouge_l": mean, "mean_seconds": seconds, "results": results}, args.json)


if __name__ == "__main__":
    main()
