"""The allocator's thresholds against the prefill's time and the peak memory (kvcli/heap.py).

    python benchmarks/heap_policy.py --tokens 4000,8000 --methods evidencekv,full --threads 2

Runs `kvcli ask DOC QUESTION --json` as a user does, once with kvcli's allocator settings (the
command line's `heap.tune()`: 32 MiB mmap threshold) and once as kvcli did before, with glibc's
`MALLOC_MMAP_THRESHOLD_=131072` in the environment (every buffer over 128 KiB its own mapping,
which `tune()` then leaves alone), alternating per case. The documents are the start of
samples/haystack.txt cut at a line to about `--tokens` tokens (by characters; kvcli
reports the exact prompt). Reported per run: prefill seconds (kvcli's
`stats.prefill_s`), decode tokens/s, the peak resident memory kvcli reports (from the end of the
load), and the child's minor page faults (`os.wait4`'s ru_minflt, the whole process). Markdown
on stdout, progress on stderr; run it alone (times on shared cores are fragile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HAYSTACK = ROOT / "samples" / "haystack.txt"
QUESTION = "Explain in detail, with examples, what the document above says about assignment statements."
POLICIES = {"kvcli (32 MiB threshold)": {}, "before (128 KiB threshold)": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


CHARS_PER_TOKEN = 4.45  # the haystack's, in the default model's tokenizer (19,000 characters: 4,243 tokens with the question)


def document(tokens: int, folder: Path) -> Path:
    """The start of the haystack, whole lines, about `tokens` tokens (kvcli reports the exact count)."""
    lines, chars = [], 0
    for line in HAYSTACK.read_text(encoding="utf-8").splitlines(keepends=True):
        chars += len(line)
        if chars > tokens * CHARS_PER_TOKEN:
            break
        lines.append(line)
    path = folder / f"haystack-{tokens}.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def run(doc: Path, method: str, threads: int, extra_env: dict) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | extra_env
    command = [sys.executable, "-m", "kvcli", "ask", str(doc), QUESTION, "--json", "--method", method,
               "--threads", str(threads), "--max-new-tokens", "16"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"kvcli failed: {err.read().decode(errors='replace')[-2000:]}")
        stats = json.loads(out.read())["stats"]
    return {"prompt_tokens": stats["prompt_tokens"], "prefill_s": stats["prefill_s"], "decode_tokens_per_s": stats["decode_tokens_per_s"],
            "peak_mib": stats["peak_memory_bytes"] / 2**20, "faults": usage.ru_minflt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="4000,8000", help="document lengths in tokens, comma-separated (default 4000,8000)")
    parser.add_argument("--methods", default="evidencekv,full", help="kvcli methods, comma-separated (default evidencekv,full)")
    parser.add_argument("--threads", type=int, default=2, help="kvcli --threads (default 2)")
    parser.add_argument("--json", metavar="OUT", help="also write the runs as JSON")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for tokens in (int(t) for t in args.tokens.split(",")):
            doc = document(tokens, Path(folder))
            for method in args.methods.split(","):
                for policy, env in POLICIES.items():
                    print(f"{tokens} tokens, {method}, {policy}", file=sys.stderr, flush=True)
                    rows.append({"tokens": tokens, "method": method, "policy": policy} | run(doc, method, args.threads, env))
    print("| prompt tokens | method | allocator | prefill s | decode tok/s | peak MiB | page faults |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['prompt_tokens']:,} | {row['method']} | {row['policy']} | {row['prefill_s']:.2f} | {row['decode_tokens_per_s']:.2f} "
              f"| {row['peak_mib']:,.0f} | {row['faults']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
