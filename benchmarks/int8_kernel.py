"""kvcli's int8 decode kernel (kvcli/models/int8_rows.c) against torch's `_weight_int8pack_mm` (issue 27).

    python benchmarks/int8_kernel.py --threads 2
    python benchmarks/int8_kernel.py --threads 2 --ask 3

Products: for each weight shape of the default model (Qwen2.5-0.5B: attention q/o 896x896, k/v
128x896, MLP gate/up 4864x896, down 896x4864, output head 151936x896), one bfloat16 row times
int8 weights with a bfloat16 scale per output channel, on torch's kernel and on kvcli's with the
weight row-major and in its blocked layout (kvcli/models/int8_rows.c), cycling through enough
distinct weights (over 200 MB) that each product reads its weight from memory, as a decode step
does. Reported: GB/s of weight read and ms per product for each, and the largest difference
between kvcli's results and torch's, relative to the largest output. The first line is how fast this
machine reads the same bytes without multiplying them (a max over them, 8 bytes at a time).

`--ask N`: N alternating pairs of `kvcli ask samples/python_exceptions.txt QUESTION --json
--max-new-tokens 64` as a user runs it, with KVCLI_INT8_KERNEL=torch and with kvcli's kernel:
decode tokens/s of each and whether the answers are the same text (where not, how many
characters they share from the start). Run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = (("q/o", 896, 896), ("k/v", 128, 896), ("gate/up", 4864, 896), ("down", 896, 4864), ("head", 151_936, 896))
STREAM_BYTES = 200_000_000
QUESTION = "Summarize the exceptions section in detail."


def per_call(calls, seconds: float = 1.0) -> float:
    """Seconds per call, cycling through `calls` for about `seconds` after one warm-up round."""
    for call in calls:
        call()
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for call in calls:
            call()
        done += len(calls)
    return (time.perf_counter() - start) / done


def products(threads: int) -> None:
    from kvcli.models import int8_kernel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kernel = int8_kernel.name()
    if kernel != int8_kernel.KVCLI:
        sys.exit(f"kvcli's int8 kernel does not run here: {int8_kernel.why_not()}")
    codes = [torch.randint(-127, 128, (STREAM_BYTES // 8 // 4,), dtype=torch.int64) for _ in range(4)]
    read = per_call([lambda c=c: c.max() for c in codes])
    print(f"torch {torch.__version__}, {threads} thread(s); reading {STREAM_BYTES // 4 // 1e6:.0f} MB blocks without multiplying: "
          f"{STREAM_BYTES / 4 / read / 1e9:.1f} GB/s")
    print("| weight | shape | torch GB/s (ms) | kvcli, row-major | kvcli, blocked | blocked / torch | largest difference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, out_features, in_features in SHAPES:
        count = max(1, STREAM_BYTES // (out_features * in_features))
        weights = [torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8) for _ in range(count)]
        blocked = [w.clone() for w in weights]
        for w in blocked:
            int8_kernel.to_blocked(w)
        scale = (torch.rand(out_features) / 100 + 1e-4).bfloat16()
        row = torch.randn(1, in_features).bfloat16()
        theirs = torch.ops.aten._weight_int8pack_mm(row, weights[0], scale).float()
        difference = max((ours.float() - theirs).abs().max().item() / theirs.abs().max().item() for ours in (
            int8_kernel.rows_product(row, weights[0], scale), int8_kernel.rows_product(row, blocked[0], scale, blocked=True)))
        seconds = [per_call([lambda w=w: torch.ops.aten._weight_int8pack_mm(row, w, scale) for w in weights]),
                   per_call([lambda w=w: int8_kernel.rows_product(row, w, scale) for w in weights]),
                   per_call([lambda w=w: int8_kernel.rows_product(row, w, scale, blocked=True) for w in blocked])]
        size = out_features * in_features
        cells = " | ".join(f"{size / t / 1e9:.1f} ({t * 1e3:.3f})" for t in seconds)
        print(f"| {label} | {out_features}x{in_features} | {cells} | {seconds[0] / seconds[2]:.2f}x | {difference:.1e} |")


def ask(pairs: int, threads: int) -> None:
    """Alternating `kvcli ask` runs on each kernel: decode tokens/s and the answers."""
    seen: dict[str, list] = {"torch": [], "kvcli": []}
    answers: dict[str, set] = {"torch": set(), "kvcli": set()}
    for pair in range(pairs):
        for kernel in ("torch", "kvcli"):
            env = dict(os.environ, KVCLI_INT8_KERNEL=kernel)
            done = subprocess.run([sys.executable, "-m", "kvcli", "ask", str(ROOT / "samples" / "python_exceptions.txt"), QUESTION,
                                   "--json", "--max-new-tokens", "64", "--threads", str(threads)],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"kvcli ask failed ({kernel}): {done.stderr.strip()[-500:]}")
            data = json.loads(done.stdout)
            stats = data["stats"]
            if stats.get("int8_kernel") != kernel:
                sys.exit(f"asked for the {kernel} kernel, the run reports {stats.get('int8_kernel')!r} (is --dtype auto int8 here?)")
            seen[kernel].append(stats["decode_tokens_per_s"])
            answers[kernel].add(data["answer"])
            print(f"pair {pair + 1}/{pairs} {kernel}: decode {stats['decode_tokens_per_s']:.2f} tokens/s, "
                  f"prefill {stats['prefill_s']:.2f} s, {stats['decode_tokens']} tokens", file=sys.stderr, flush=True)
    rates = {kernel: sorted(values) for kernel, values in seen.items()}
    print(f"`kvcli ask` decode tokens/s, {pairs} alternating pairs: torch {', '.join(f'{r:.2f}' for r in rates['torch'])}; "
          f"kvcli {', '.join(f'{r:.2f}' for r in rates['kvcli'])}; "
          f"ratio of medians {rates['kvcli'][len(rates['kvcli']) // 2] / rates['torch'][len(rates['torch']) // 2]:.2f}x; "
          f"answers: {compare(answers)}")


def compare(answers: dict[str, set]) -> str:
    """Whether each kernel answered one text in every run, and how far the two agree from the start."""
    if any(len(texts) != 1 for texts in answers.values()):
        return "a kernel answered differently between its own runs"
    ours, theirs = next(iter(answers["kvcli"])), next(iter(answers["torch"]))
    if ours == theirs:
        return "the same text"
    common = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"each kernel the same text in every run; they differ after {common} characters in common "
            f"(torch's: {theirs[common:common + 40]!r}..., kvcli's: {ours[common:common + 40]!r}...)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    parser.add_argument("--ask", type=int, default=0, metavar="N", help="also N alternating pairs of kvcli ask (default 0)")
    args = parser.parse_args(argv)
    products(args.threads)
    if args.ask:
        ask(args.ask, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
