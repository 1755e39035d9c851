"""One document, many questions: the data for `kvcli eval --modes`, the time a saved cache saves,
and the memory chunked prefill saves. Every measurement runs kvcli's own command line.

    # 1. rows for the eval harness: one document with ten facts, one question per fact
    python benchmarks/reuse_check.py data -m qwen2.5-coder-0.5b --length 3000 -o questions.jsonl
    kvcli eval --data questions.jsonl --metric contains --methods full,dynamickv,evidencekv \\
        --ratios 0.1 --modes query,reuse,chunked --chunk-size 512 --max-new-tokens 24 -o modes.json

    # 2. ten questions, every way kvcli answers them: ten separate `kvcli ask` runs (fresh
    #    processes, as a user types them), one `ask -q x10` (read once), `kvcli read` + one
    #    `ask --cache` (full prefix, fp32 and bf16 files), `kvcli compress` + one `ask --cache`
    python benchmarks/reuse_check.py time -m qwen2.5-coder-0.5b --length 7000 --ratio 0.1 --json time.json

    # 3. peak memory of one `kvcli ask` reading a long document in one pass vs in chunks
    python benchmarks/reuse_check.py memory -m qwen2.5-coder-0.5b --length 32000 --chunk-size 1024 --json memory.json

The document is real prose (samples/haystack.txt, or CPython's reference documentation for
lengths beyond it) with the facts hidden at evenly spread depths. Times are wall-clock seconds of
whole processes (model load included, as a user pays it); read them as ratios measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (fact, question, what a correct answer contains)
FACTS = [
    ("The key to the archive room is kept under the blue ceramic owl on the librarian's desk.", "Where is the key to the archive room kept?", "owl"),
    ("Maria's favourite fruit, she once told the committee, has always been the persimmon.", "Which fruit does Maria like best?", "persimmon"),
    ("The secret passphrase for the vault is indigo-walrus-17.", "What is the secret passphrase for the vault?", "indigo-walrus-17"),
    ("The night train to Tromso leaves from platform nine at a quarter past eleven.", "Which platform does the night train to Tromso leave from?", "nine"),
    ("Our bakery's sourdough starter is named Clementine and is fed rye flour every morning.", "What is the bakery's sourdough starter called?", "clementine"),
    ("The lighthouse keeper's dog, a grey lurcher, answers only to the name Biscuit.", "What is the name of the lighthouse keeper's dog?", "biscuit"),
    ("The choir rehearses every Thursday in the old tannery on Wexford Lane.", "Where does the choir rehearse?", "tannery"),
    ("Dr. Okafor's prize-winning orchid was grown from a seed found in Madagascar.", "Where was the seed of Dr. Okafor's orchid found?", "madagascar"),
    ("The museum's oldest clock was built in 1742 by a watchmaker from Lyon.", "In which year was the museum's oldest clock built?", "1742"),
    ("The treasurer keeps the spare minutes of every meeting in a green tin box.", "Where does the treasurer keep the spare minutes?", "tin"),
]


def prose(tokenizer, n_tokens: int) -> str:
    """About `n_tokens` tokens of real English prose, cut at a paragraph end."""
    text = (ROOT / "samples" / "haystack.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens * 1.05:
        from pydoc_data.topics import topics  # ~800 KB of CPython's reference documentation

        text = "\n\n".join(topics[name] for name in sorted(topics))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:  # longer than all the prose there is: the prose again, from its start (said on stderr)
        print(f"only {len(ids):,} tokens of prose: repeating it to make {n_tokens:,}", file=sys.stderr)
        ids = ids * -(-n_tokens // len(ids))
    cut = tokenizer.decode(ids[:n_tokens])
    end = cut.rfind("\n\n")
    return cut[:end] if end > len(cut) // 2 else cut


def build_document(tokenizer, length: int, facts=FACTS) -> str:
    """About `length` tokens of prose with every fact hidden at evenly spread depths."""
    return hide_facts(prose(tokenizer, length), facts)


def hide_facts(text: str, facts) -> str:
    """`text` with every fact put in at evenly spread depths, each at a sentence start."""
    for i, (fact, _, _) in enumerate(facts):
        depth = (i + 0.5) / len(facts)
        at = text.rfind(". ", 0, int(len(text) * depth))
        at = 0 if at < 0 else at + 2
        text = text[:at] + fact + " " + text[at:]
    return text


def load_tokenizer(model: str | None):
    from kvcli.models import load_model

    return load_model(model).tokenizer


def kvcli(*args: str) -> tuple[float, list[dict]]:
    """Run `kvcli ARGS --json` as a user would; its wall time and its JSON lines."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kvcli", *args, "--json", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"kvcli {' '.join(args[:2])} ... failed: {done.stderr.strip()}")
    return seconds, [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def write_result(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def cmd_data(args) -> None:
    tokenizer = load_tokenizer(args.model)
    document = build_document(tokenizer, args.length)
    with open(args.output, "w", encoding="utf-8") as out:
        for i, (_, question, expected) in enumerate(FACTS):
            out.write(json.dumps({"_id": f"fact{i}", "context": document, "input": question, "answers": [expected]}) + "\n")
    print(f"wrote {len(FACTS)} rows ({len(tokenizer(document)['input_ids'])} document tokens) to {args.output}", file=sys.stderr)


def cmd_time(args) -> None:
    """Ten questions about one document, each way kvcli can answer them, side by side in one run."""
    tokenizer = load_tokenizer(args.model)
    model = ["-m", args.model] if args.model else []
    compression = ["--method", args.method, "--ratio", str(args.ratio)]
    answering = ["--max-new-tokens", str(args.max_new_tokens), *model]
    facts = FACTS[: args.questions]
    asked = [a for _, q, _ in facts for a in ("-q", q)]
    ways = [name.strip() for name in args.ways.split(",") if name.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "document.txt"
        doc.write_text(build_document(tokenizer, args.length), encoding="utf-8")

        def run_way(name: str) -> tuple[list[tuple[float, list[dict]]], Path | None]:
            kvc = Path(tmp) / f"{name}.kvc"
            if name == "separate":  # ten `kvcli ask` processes, as a user types them
                return [kvcli("ask", str(doc), q, *compression, *answering) for _, q, _ in facts], None
            if name == "once":  # one `kvcli ask -q ... -q ...`: the document read once
                return [kvcli("ask", str(doc), *asked, *compression, *answering)], None
            if name in ("read", "read-bf16"):  # `kvcli read` (full prefix) + one `ask --cache` with ten -q
                dtype = ["--save-dtype", "bfloat16"] if name == "read-bf16" else []
                made = kvcli("read", str(doc), "-o", str(kvc), *dtype, *model)
                return [made, kvcli("ask", "--cache", str(kvc), *asked, *compression, *answering)], kvc
            if name.startswith("compress"):  # `kvcli compress` (question-agnostic) + one `ask --cache`
                scorer = ["--scorer", name.split(":", 1)[1]] if ":" in name else []
                made = kvcli("compress", str(doc), "-o", str(kvc), *compression, *scorer, *model)
                return [made, kvcli("ask", "--cache", str(kvc), *asked, *answering)], kvc
            if name == "chat":  # `kvcli chat` with the questions piped in, one per line
                return [kvcli_piped(["chat", str(doc), *compression, *answering], "".join(q + "\n" for _, q, _ in facts))], None
            raise SystemExit(f"unknown way {name!r}")

        for name in ways:
            runs, kvc = run_way(name)
            lines = [line for _, out in runs for line in out if "answer" in line]
            answers = [line["answer"] for line in lines]
            results[name] = {
                "seconds": round(sum(seconds for seconds, _ in runs), 1),
                "processes": len(runs),
                "found": sum(expected in a.lower() for a, (_, _, expected) in zip(answers, facts)),
                "file_bytes": kvc.stat().st_size if kvc is not None and kvc.exists() else None,
                "peak_memory_bytes": max((line["stats"]["peak_memory_bytes"] for line in lines), default=None),
                "answers": answers,
            }
            print(f"{name}: {results[name]['seconds']} s, found {results[name]['found']}/{len(facts)}", file=sys.stderr)
    base = results.get("separate")
    for name, row in results.items():
        if base is not None:
            row["speedup_vs_separate"] = round(base["seconds"] / row["seconds"], 2)
            row["answers_equal_separate"] = row["answers"] == base["answers"]
    write_result({
        "model": args.model or "default", "method": args.method, "ratio": args.ratio, "questions": len(facts),
        "length": args.length, "ways": results,
    }, args.json)


def kvcli_piped(args: list[str], stdin: str) -> tuple[float, list[dict]]:
    """Run `kvcli ARGS --json --quiet` with `stdin` piped in; its wall time and its JSON lines."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kvcli", *args, "--json", "--quiet"], input=stdin, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"kvcli {args[0]} ... failed: {done.stderr.strip()}")
    return seconds, [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def cmd_memory(args) -> None:
    tokenizer = load_tokenizer(args.model)
    model = ["-m", args.model] if args.model else []
    fact, question, expected = FACTS[2]
    knobs = ["--method", args.method, "--ratio", str(args.ratio), "--max-new-tokens", str(args.max_new_tokens), *model]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.txt"
        small.write_text(build_document(tokenizer, 200, [(fact, question, expected)]), encoding="utf-8")
        doc = Path(tmp) / "document.txt"
        doc.write_text(build_document(tokenizer, args.length, [(fact, question, expected)]), encoding="utf-8")
        # The model and the runtime alone: the same command on a 200-token document.
        _, (base,) = kvcli("ask", str(small), question, *knobs)
        for name, extra in (("one_pass", []), ("chunked", ["--chunk-size", str(args.chunk_size)])):
            seconds, (line,) = kvcli("ask", str(doc), question, *knobs, *extra)
            stats = line["stats"]
            runs[name] = {
                "seconds": round(seconds, 1), "prefill_s": round(stats["prefill_s"], 1),
                "peak_rss_bytes": stats["peak_memory_bytes"],
                "peak_rss_above_small_doc_bytes": stats["peak_memory_bytes"] - base["stats"]["peak_memory_bytes"],
                "kv_bytes_peak": stats["kv_bytes_peak"], "kv_bytes_kept": stats["kv_bytes_kept"],
                "found": expected in line["answer"].lower(), "answer": line["answer"],
                "chunks": len(stats["extra"].get("chunks", [])) or 1,
            }
            prompt_tokens, kv_full = stats["prompt_tokens"], stats["kv_bytes_full"]
            print(f"{name}: {seconds:.0f} s", file=sys.stderr)
    one, chunked = runs["one_pass"], runs["chunked"]
    write_result({
        "model": args.model or "default", "method": args.method, "ratio": args.ratio, "chunk_size": args.chunk_size,
        "prompt_tokens": prompt_tokens, "kv_bytes_full": kv_full, "small_doc_peak_rss_bytes": base["stats"]["peak_memory_bytes"],
        **runs,
        "kv_peak_chunked_vs_one_pass": round(chunked["kv_bytes_peak"] / one["kv_bytes_peak"], 3),
        "rss_above_small_doc_chunked_vs_one_pass": round(chunked["peak_rss_above_small_doc_bytes"] / one["peak_rss_above_small_doc_bytes"], 3),
        "prefill_chunked_vs_one_pass": round(chunked["prefill_s"] / one["prefill_s"], 3),
    }, args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("data", cmd_data), ("time", cmd_time), ("memory", cmd_memory)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("-m", "--model", default=None, help="embedded name or path (default: kvcli's default model)")
        p.add_argument("--length", type=int, default=3000, help="document length in tokens")
        if name == "data":
            p.add_argument("-o", "--output", required=True, help="JSONL file to write (LongBench layout)")
            continue
        p.add_argument("--method", default="dynamickv")
        p.add_argument("--ratio", type=float, default=0.1)
        p.add_argument("--max-new-tokens", type=int, default=24)
        p.add_argument("--json", default=None, help="also write the result here")
        if name == "time":
            p.add_argument("--questions", type=int, default=len(FACTS), help=f"how many questions (at most {len(FACTS)})")
            p.add_argument("--ways", default="separate,once,read,read-bf16,compress",
                           help="comma-separated: separate, once, read, read-bf16, compress, compress:SCORER, chat")
        else:
            p.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.func(args)


if __name__ == "__main__":
    main()
