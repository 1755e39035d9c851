"""Prefill time, time to the first token and peak memory: `ask --skim` against the one-pass read and the full cache.

    python benchmarks/skim_speed.py -m qwen2.5-coder-0.5b --lengths 2000,8000,32000 --reads query,skim,full
    python benchmarks/skim_speed.py -m qwen2.5-coder-0.5b --lengths 64000 --reads query,skim   # past the positions

Each read is one `kvcli ask ... --json` process (so peak memory is its own), on a needle document
of about `--lengths` tokens of CPython's reference prose (pydoc topics) with one fact at mid depth;
the reads of one length run one after another, repeated `--repeat` times in turn, and the report
gives each read's median and its ratio to the one-pass read of the same length: ratios in one run,
on one machine. Run it alone on the machine. `query` is the default method at the default ratio,
`skim` the same with --skim, `full` --method full; `--flags` adds flags to every read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pydoc_data.topics import topics

from kvcli.eval import niah_rows
from kvcli.models import load_model

FACT = ("The treasurer's password is saffron-otter-63.", "What is the treasurer's password?", "saffron-otter-63")
READS = {"query": [], "skim": ["--skim"], "full": ["--method", "full"]}


def document(length: int, tokenizer) -> str:
    names = sorted(topics)
    text = "\n\n".join(topics[name].strip() for name in names)
    while len(text) < 6 * length:
        text += "\n\n" + text
    (row,) = niah_rows(text, FACT[0], FACT[1], FACT[2], [length], [0.5], tokenizer)
    return row.context


def ask(path: Path, model: str | None, flags: list[str]) -> dict:
    command = [sys.executable, "-m", "kvcli", "ask", str(path), FACT[1], "--json", "--max-new-tokens", "12", *flags]
    if model:
        command += ["-m", model]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kvcli failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout)
    stats = out["stats"]
    return {"prefill_s": stats["prefill_s"], "ttft_s": stats["ttft_s"], "peak_mib": stats["peak_memory_bytes"] / 2**20,
            "right": FACT[2] in out["answer"].lower(), "read": stats["read"], "tokens": stats["prompt_tokens"],
            "skim": stats["extra"].get("skim")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--lengths", default="2000,8000")
    parser.add_argument("--reads", default="query,skim,full")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--flags", default="", help="more flags for every read, e.g. '--threads 2'")
    args = parser.parse_args()
    tokenizer = load_model(args.model).tokenizer
    reads = args.reads.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in map(int, args.lengths.split(",")):
            path = Path(tmp) / f"doc-{length}.txt"
            path.write_text(document(length, tokenizer))
            runs: dict[str, list[dict]] = {name: [] for name in reads}
            for _ in range(args.repeat):
                for name in reads:
                    result = ask(path, args.model, READS[name] + args.flags.split())
                    runs[name].append(result)
                    print(f"{length} {name}: {result}", file=sys.stderr, flush=True)
            base = statistics.median(r["prefill_s"] for r in runs[reads[0]])
            for name in reads:
                got = runs[name]
                prefill = statistics.median(r["prefill_s"] for r in got)
                rows.append((length, got[0]["tokens"], name, got[0]["read"], prefill, prefill / base,
                             statistics.median(r["ttft_s"] for r in got), max(r["peak_mib"] for r in got),
                             sum(r["right"] for r in got), len(got), got[0]["skim"]))
    print(f"model {args.model or 'default'}; reads: {', '.join(reads)}; {args.repeat} run(s) each, medians; ratio to {reads[0]}")
    print("| length | prompt tokens | read | mode | prefill s | x " + reads[0] + " | first token s | peak MiB | right | skim |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for length, tokens, name, mode, prefill, ratio, ttft, peak, right, n, skim in rows:
        if not skim:
            part = ""
        elif "skipped" in skim:
            part = f"read in one pass: {skim['skipped']}"
        else:
            part = f"{skim['filter_layers']}/{skim['layers']} layers {skim['filter_s']:.1f}s, {skim['continued_tokens']} tokens {skim['read_s']:.1f}s"
        print(f"| {length} | {tokens} | {name} | {mode} | {prefill:.1f} | {ratio:.2f} | {ttft:.1f} | {peak:.0f} | {right}/{n} | {part} |")


if __name__ == "__main__":
    main()
