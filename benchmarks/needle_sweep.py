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

from kvcli.evaluate import niah_rows
from kvcli.generate import capture, decode
from kvcli.methods import apply_params, make_method, parse_params, plan_budget
from kvcli.models import load_model
from kvcli.pipeline import Engine, Options
from reuse_check import FACTS as ALL_FACTS  # benchmarks/ is on sys.path when a script in it runs

FACTS = ALL_FACTS[:3]  # (fact, question, what a correct answer contains)


def variant(engine: Engine, spec: str):
    name, *knobs = spec.split(":")
    method = apply_params(make_method(name), parse_params(knobs), strict=True)
    return engine.prepare(method)


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

    engine = Engine(load_model(args.model))
    haystack = (Path(__file__).resolve().parent.parent / "samples" / "haystack.txt").read_text()
    depths = [float(d) for d in args.depths.split(",")]
    levels = [("budget", int(b)) for b in args.budgets.split(",")] if args.budgets else [("ratio", float(r)) for r in (args.ratios or "0.05").split(",")]
    specs = args.variants.split(";")
    found: dict[tuple, int] = {}
    cases = 0
    for fact, question, answer in FACTS:
        for row in niah_rows(haystack, fact, question, answer, [args.length], depths, engine.tokenizer):
            prompt = engine.prompt(row.context, question, Options(max_new_tokens=args.max_new_tokens))
            started = time.perf_counter()
            captured = capture(engine.model, prompt.ids, 8)
            marks = []
            for kind, level in levels:
                for spec in specs:
                    method = variant(engine, spec)
                    plan = plan_budget(len(prompt), engine.num_layers, window_size=method.window_size, **{kind: level})
                    tokens = decode(engine.model, captured.derive(method, plan), args.max_new_tokens, engine.eos_ids)
                    ok = answer in engine.tokenizer.decode(list(tokens)).lower()
                    found[(spec, kind, level)] = found.get((spec, kind, level), 0) + ok
                    marks.append("Y" if ok else ".")
            cases += 1
            print(f"{row.id} {answer:>16} {''.join(marks)}  ({time.perf_counter() - started:.0f}s)", flush=True)
    print(f"\nfound out of {cases} cases ({engine.lm.name}, {args.length}-token prompts):")
    for (spec, kind, level), n in found.items():
        print(f"  {spec:<48} {kind} {level}: {n}/{cases}")


if __name__ == "__main__":
    main()
