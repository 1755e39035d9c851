"""Needle sweep: several facts x depths, one prefill each, many method variants from it.

    python benchmarks/needle_sweep.py -m qwen2.5-coder-0.5b --length 2000 --budgets 64 \
        --variants "snapkv;dynamickv;evidencekv;evidencekv:shared_fraction=0.5"

Each variant is `method[:knob=value...]`. The facts are placed in real prose (the start of
samples/haystack.txt) at each depth; a case counts as found when the answer word appears in
the greedy answer. Used to choose evidencekv's defaults (docs/results.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvcli.eval import niah_rows
from kvcli.methods import Budget, apply_params, make_method, parse_params
from kvcli.models import load_model
from kvcli.reading import Options, QueryAware, Reader, answer
from reuse_check import FACTS as ALL_FACTS  # benchmarks/ is on sys.path when a script in it runs

FACTS = ALL_FACTS[:3]  # (fact, question, what a correct answer contains)


def variant(spec: str):
    name, *knobs = spec.split(":")
    return apply_params(make_method(name), parse_params(knobs), strict=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--length", type=int, default=2000, help="prompt length in model tokens")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--budgets", default=None, help="tokens per layer, comma-separated")
    parser.add_argument("--ratios", default=None, help="or fractions kept, comma-separated")
    parser.add_argument("--variants", default="snapkv;dynamickv;evidencekv")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()

    reader = Reader(load_model(args.model))
    options = Options(max_new_tokens=args.max_new_tokens)
    haystack = (Path(__file__).resolve().parent.parent / "samples" / "haystack.txt").read_text()
    depths = [float(d) for d in args.depths.split(",")]
    levels = [("budget", int(b)) for b in args.budgets.split(",")] if args.budgets else [("ratio", float(r)) for r in (args.ratios or "0.05").split(",")]
    specs = args.variants.split(";")
    methods = [(spec, variant(spec)) for spec in specs]
    compressing = [m for _, m in methods if m.compresses]
    # One capture serves every variant: its window is the widest, with all-query attention if H2O is there.
    window_size = max((m.window_size for m in compressing), default=1)
    accumulated = any(m.needs_accumulated for m in compressing)
    found: dict[tuple, int] = {}
    cases = 0
    for fact, question, expected in FACTS:
        for row in niah_rows(haystack, fact, question, expected, [args.length], depths, reader.tokenizer):
            document = QueryAware(reader, row.context, options)
            started = time.perf_counter()
            captured = document.capture(question, window_size, accumulated)
            marks = []
            for kind, level in levels:
                budget = Budget(tokens=level) if kind == "budget" else Budget(ratio=level)
                for spec, method in methods:
                    reading = document.derive(captured, question, method, budget)
                    ok = expected in answer(reader, reading, options).text.lower()
                    found[(spec, kind, level)] = found.get((spec, kind, level), 0) + ok
                    marks.append("Y" if ok else ".")
            cases += 1
            print(f"{row.id} {expected:>16} {''.join(marks)}  ({time.perf_counter() - started:.0f}s)", flush=True)
    print(f"\nfound out of {cases} cases ({reader.lm.name}, {args.length}-token prompts):")
    for (spec, kind, level), n in found.items():
        print(f"  {spec:<48} {kind} {level}: {n}/{cases}")


if __name__ == "__main__":
    main()
