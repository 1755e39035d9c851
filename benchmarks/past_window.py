"""Documents longer than the model's context, read whole: prefill time, peak memory and whether
a fact hidden in the middle is found, against document length; and the same document cut in
the middle (`--cut-middle`). Every run is a `kvcli ask` process, as a user would type it.

    # time and memory against length (the cache must stay at budget + one chunk; time linear)
    python benchmarks/past_window.py lengths -m smollm2-135m --lengths 8000,16000,32000,64000,128000 --json past-smollm.json
    # a fact at depths 0.1 / 0.5 / 0.9 of documents 4x --max-context: re-indexed reading vs the middle cut
    python benchmarks/past_window.py needle -m qwen2.5-coder-0.5b --length 16000 --max-context 4096 --json needle.json
    # four questions about one document 4x --max-context: `ask -q` x 4 against `compress` + `ask --cache`
    python benchmarks/past_window.py questions --length 8000 --max-context 2048 --budget 256 --json questions.json

The document is real prose (CPython's reference documentation, `pydoc_data.topics`) with one
fact inserted; times are wall-clock seconds of whole processes (model load included).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reuse_check import FACTS, build_document, kvcli, load_tokenizer, write_result  # noqa: E402


def ask(doc: Path, question: str, args, *extra: str) -> dict:
    model = ["-m", args.model] if args.model else []
    seconds, (line,) = kvcli("ask", str(doc), question, "--method", args.method, "--budget", str(args.budget),
                             "--max-new-tokens", str(args.max_new_tokens), *model, *extra)
    stats = line["stats"]
    past = stats["extra"].get("past_window") or {}
    return {
        "seconds": round(seconds, 1), "prefill_s": round(stats["prefill_s"], 1), "prompt_tokens": stats["prompt_tokens"],
        "read": stats["read"], "chunks": past.get("chunks"), "dropped_tokens": stats["dropped_tokens"],
        "kv_bytes_peak": stats["kv_bytes_peak"], "kv_bytes_kept": stats["kv_bytes_kept"], "kv_bytes_full": stats["kv_bytes_full"],
        "peak_memory_bytes": stats["peak_memory_bytes"], "answer": line["answer"],
    }


def cmd_lengths(args) -> None:
    tokenizer = load_tokenizer(args.model)
    fact, question, expected = FACTS[2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in (int(x) for x in args.lengths.split(",")):
            doc = Path(tmp) / f"doc-{length}.txt"
            doc.write_text(build_document(tokenizer, length, [(fact, question, expected)]), encoding="utf-8")
            extra = ["--max-context", str(args.max_context)] if args.max_context else []
            row = {"length": length, **ask(doc, question, args, *extra)}
            row["found"] = expected in row["answer"].lower()
            rows.append(row)
            print(f"{length}: {row['prefill_s']} s prefill, {row['chunks']} chunks, found={row['found']}", file=sys.stderr)
    first = rows[0]
    for row in rows:
        row["prefill_per_token_vs_first"] = round((row["prefill_s"] / row["prompt_tokens"]) / (first["prefill_s"] / first["prompt_tokens"]), 2)
    write_result({"model": args.model or "default", "method": args.method, "budget": args.budget, "max_context": args.max_context, "rows": rows}, args.json)


def cmd_needle(args) -> None:
    tokenizer = load_tokenizer(args.model)
    fact, question, expected = FACTS[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in (float(x) for x in args.depths.split(",")):
            text = build_document(tokenizer, args.length, [])
            at = text.rfind(". ", 0, int(len(text) * depth))
            text = text[: at + 2] + fact + " " + text[at + 2 :]
            doc = Path(tmp) / f"doc-{depth}.txt"
            doc.write_text(text, encoding="utf-8")
            for how, extra in (("reindexed", []), ("cut", ["--cut-middle"])):
                row = {"depth": depth, "how": how, **ask(doc, question, args, "--max-context", str(args.max_context), *extra)}
                row["found"] = expected in row["answer"].lower()
                rows.append(row)
                print(f"depth {depth} {how}: found={row['found']} ({row['prefill_s']} s)", file=sys.stderr)
    found = {how: sum(r["found"] for r in rows if r["how"] == how) for how in ("reindexed", "cut")}
    write_result({"model": args.model or "default", "method": args.method, "budget": args.budget, "length": args.length,
                  "max_context": args.max_context, "found": found, "cases": len(rows) // 2, "rows": rows}, args.json)


def cmd_questions(args) -> None:
    """Several questions about one document past the context, the two ways kvcli offers: `ask -q`
    x N (each question reads the whole document again, query-aware) and `kvcli compress` (one
    question-agnostic read, the instruction probing every chunk) + `ask --cache -q` x N."""
    tokenizer = load_tokenizer(args.model)
    facts = FACTS[: args.questions]
    model = ["-m", args.model] if args.model else []
    common = ["--method", args.method, "--budget", str(args.budget), "--max-context", str(args.max_context), *model]
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "doc.txt"
        doc.write_text(build_document(tokenizer, args.length, facts), encoding="utf-8")
        asks = [a for _, question, _ in facts for a in ("-q", question)]
        answers = {}
        seconds, lines = kvcli("ask", str(doc), *asks, *common, "--max-new-tokens", str(args.max_new_tokens))
        answers["ask -q (query-aware, a read per question)"] = (seconds, lines)
        cache = Path(tmp) / "doc.kvc"
        made_s, made = kvcli("compress", str(doc), "-o", str(cache), *common)
        seconds, lines = kvcli("ask", "--cache", str(cache), *asks, *model, "--max-new-tokens", str(args.max_new_tokens))
        answers["compress + ask --cache -q (question-agnostic, one read)"] = (made_s + seconds, lines)
    rows = []
    for how, (seconds, lines) in answers.items():
        found = [expected in line["answer"].lower() for (_, _, expected), line in zip(facts, lines)]
        reads = {line["stats"]["read"] for line in lines}
        rows.append({"how": how, "found": sum(found), "questions": len(facts), "seconds": round(seconds, 1), "reads": sorted(reads),
                     "answers": [line["answer"] for line in lines]})
        print(f"{how}: {sum(found)}/{len(facts)} found, {seconds:.0f} s", file=sys.stderr)
    write_result({"model": args.model or "default", "method": args.method, "budget": args.budget, "length": args.length,
                  "max_context": args.max_context, "compress": made[0] if made else None, "rows": rows}, args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("lengths", cmd_lengths), ("needle", cmd_needle), ("questions", cmd_questions)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("-m", "--model", default=None)
        p.add_argument("--method", default="evidencekv")
        p.add_argument("--budget", type=int, default=128, help="mean tokens kept per layer")
        p.add_argument("--max-new-tokens", type=int, default=24)
        p.add_argument("--json", default=None)
        if name == "lengths":
            p.add_argument("--lengths", default="8000,16000,32000")
            p.add_argument("--max-context", type=int, default=None, help="positions the model reads (default: its own)")
        else:
            p.add_argument("--length", type=int, default=16000)
            p.add_argument("--max-context", type=int, default=4096)
        if name == "needle":
            p.add_argument("--depths", default="0.1,0.5,0.9")
        if name == "questions":
            p.add_argument("--questions", type=int, default=4, help=f"how many facts and questions (at most {len(FACTS)})")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.func(args)


if __name__ == "__main__":
    main()
