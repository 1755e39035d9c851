"""Needle sweep: several facts x depths, one prefill each, many method variants from it.

    python benchmarks/needle_sweep.py -m qwen2.5-coder-0.5b --length 2000 --budgets 64 \
        --variants "snapkv;dynamickv;evidencekv;evidencekv:shared_fraction=0.5"

Each variant is `method[:knob=value...]`. The facts are placed in real prose (the start of
samples/haystack.txt) at each depth; a case counts as found when the answer word appears in
the greedy answer. Used to choose evidencekv's defaults (docs/results.md).

With `--distractor`, each fact's near-duplicate (DISTRACTORS: the same kind of sentence about a
neighbouring subject, with another answer) is put into the prose half the document away from
the fact (depth + 0.5, wrapped), so a cache that keeps the wrong one answers with its word;
such answers are counted apart ("took the distractor").

    python benchmarks/needle_sweep.py --length 24000 --depths 0.3,0.7 --budgets 32,64 --facts 2 --distractor --haystack pydoc \
        --variants "snapkv;snapkv:head_split=adaptive;snapkv:head_split=global;snapkv:head_split=global:head_floor=0.5;dynamickv;dynamickv:head_split=adaptive;evidencekv"
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
from skim_filter import haystack_text

FACTS = ALL_FACTS[:3]  # (fact, question, what a correct answer contains)
# A near-duplicate of each fact above: the same question could be answered from it, wrongly.
DISTRACTORS = {
    "owl": ("The key to the archive annex is kept under the red clay frog on the porter's shelf.", "frog"),
    "persimmon": ("Marta's favourite fruit, she once told the council, has always been the quince.", "quince"),
    "indigo-walrus-17": ("The old passphrase for the safe was amber-heron-42.", "amber-heron-42"),
}


def with_distractor(haystack: str, sentence: str, at_chars: int) -> str:
    """`haystack` with `sentence` put in at the first sentence end after `at_chars`."""
    cut = haystack.find(". ", at_chars)
    if cut < 0:
        return f"{haystack.rstrip()} {sentence}\n"
    return f"{haystack[: cut + 2]}{sentence} {haystack[cut + 2 :]}"


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
    parser.add_argument("--facts", type=int, default=len(FACTS), help=f"how many of the {len(FACTS)} facts (default all)")
    parser.add_argument("--distractor", action="store_true", help="put each fact's near-duplicate half the document away")
    parser.add_argument("--haystack", choices=("samples", "pydoc"), default="samples",
                        help="the prose: samples/haystack.txt (~10.8K tokens) or Python's pydoc topics (skim_filter's, ~200K)")
    args = parser.parse_args()

    reader = Reader(load_model(args.model))
    options = Options(max_new_tokens=args.max_new_tokens)
    haystack = (Path(__file__).resolve().parent.parent / "samples" / "haystack.txt").read_text() if args.haystack == "samples" else haystack_text(None)
    depths = [float(d) for d in args.depths.split(",")]
    levels = [("budget", int(b)) for b in args.budgets.split(",")] if args.budgets else [("ratio", float(r)) for r in (args.ratios or "0.05").split(",")]
    specs = args.variants.split(";")
    methods = [(spec, variant(spec)) for spec in specs]
    compressing = [m for _, m in methods if m.compresses]
    # One capture serves every variant: its window is the widest, with all-query attention if H2O is there.
    window_size = max((m.window_size for m in compressing), default=1)
    accumulated = any(m.needs_accumulated for m in compressing)
    found: dict[tuple, int] = {}
    distracted: dict[tuple, int] = {}
    cases = 0
    sample = haystack[:200_000]
    chars_per_token = len(sample) / len(reader.tokenizer(sample, add_special_tokens=False)["input_ids"])
    for fact, question, expected in FACTS[: args.facts]:
        rows = []
        for depth in depths:
            text = haystack
            if args.distractor:
                decoy = DISTRACTORS[expected][0]
                text = with_distractor(haystack, decoy, int(((depth + 0.5) % 1.0) * args.length * chars_per_token))
            rows += niah_rows(text, fact, question, expected, [args.length], [depth], reader.tokenizer)
        for row in rows:
            document = QueryAware(reader, row.context, options)
            started = time.perf_counter()
            captured = document.capture(question, window_size, accumulated)
            marks = []
            for kind, level in levels:
                budget = Budget(tokens=level) if kind == "budget" else Budget(ratio=level)
                for spec, method in methods:
                    reading = document.derive(captured, question, method, budget)
                    text = answer(reader, reading, options).text.lower()
                    ok = expected in text
                    wrong = args.distractor and not ok and DISTRACTORS[expected][1] in text
                    found[(spec, kind, level)] = found.get((spec, kind, level), 0) + ok
                    distracted[(spec, kind, level)] = distracted.get((spec, kind, level), 0) + wrong
                    marks.append("Y" if ok else "D" if wrong else ".")
            cases += 1
            print(f"{row.id} {expected:>16} {''.join(marks)}  ({time.perf_counter() - started:.0f}s)", flush=True)
    print(f"\nfound out of {cases} cases ({reader.lm.name}, {args.length}-token prompts):")
    for (spec, kind, level), n in found.items():
        took = f", took the distractor {distracted[(spec, kind, level)]}" if args.distractor else ""
        print(f"  {spec:<48} {kind} {level}: {n}/{cases}{took}")


if __name__ == "__main__":
    main()
