"""Needle answers read with skim variants beside the one-pass read of the same method and budget.

    python benchmarks/skim_answers.py -m qwen2.5-coder-0.5b --lengths 4000,8000 --haystack FILE \
        --variants "default;positions=packed;tokens=1024;depth=0.4"

Each variant is `;`-separated `key=value,...` over `reading.skim.Skimming`'s fields (tokens, depth,
heads, positions, span; `default` is Skimming()). Every needle document (facts of
benchmarks/skim_filter.py, held-out prose: `--haystack`) is read by the one-pass read and by each
variant through `reading.policy.choose`, as `kvcli ask` reads it, and answered greedily; a read is
right when its answer holds the fact's answer. The table gives, per read, right answers, answers
equal to the one-pass read's, and the median prefill seconds (timings are only comparable within
one run on a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import fields

from kvcli.methods import DEFAULT_METHOD, Budget, make_method
from kvcli.models import load_model
from kvcli.reading import Options, Reader, answer
from kvcli.reading.policy import choose
from kvcli.reading.skim import Skimming
from skim_filter import AnswerTally, haystack_text, needle_documents


def variant(spec: str) -> Skimming:
    if spec.strip() == "default":
        return Skimming()
    kinds = {f.name: f.type for f in fields(Skimming)}
    values = {}
    for item in spec.split(","):
        key, value = item.split("=")
        kind = kinds[key]
        values[key] = value if "str" in str(kind) else (float(value) if key == "depth" else int(value))
    return Skimming(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--haystack", default=None)
    parser.add_argument("--lengths", default="4000,8000")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--budget", type=int, default=None, help="tokens per layer [default: the default ratio and floor]")
    parser.add_argument("--variants", default="default")
    args = parser.parse_args()
    lm = load_model(args.model)
    reader = Reader(lm)
    method = make_method(args.method)
    text = haystack_text(args.haystack)
    names = ["one pass"] + args.variants.split(";")
    budget = Budget(tokens=args.budget) if args.budget else Budget()
    tally = AnswerTally(names)
    lengths, depths = [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")]
    for length, depth, row, _, question, expected in needle_documents(text, lengths, depths, lm.tokenizer, seed=1):
        tally.case()
        for name in names:
            skim = None if name == "one pass" else variant(name)
            options = Options(budget=budget, max_new_tokens=24, skim=skim)
            mode = choose(reader, row.context, options, method, [question])
            reading = mode.read(question, method)
            said = answer(reader, reading, options).text
            tally.add(name, said, expected, reading.state.seconds)
            print(f"{length} {depth} {name}: {reading.mode} {reading.state.seconds:.1f}s {said[:60]!r}", file=sys.stderr, flush=True)
    print(f"model {lm.name}; method {method.name} at {budget.label}; {tally.cases} needle documents ({args.lengths} tokens x depths {args.depths}); "
          f"haystack {args.haystack or 'pydoc topics'}")
    print("| read | right | same answer as one pass | median prefill s |")
    print("| --- | --- | --- | --- |")
    for name in names:
        print(f"| {name} | {tally.right[name]}/{tally.cases} | {tally.same[name]}/{tally.cases} | {statistics.median(tally.seconds[name]):.1f} |")


if __name__ == "__main__":
    main()
