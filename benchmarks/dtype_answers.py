"""Needle answers of the same model loaded in each `--dtype`, beside the first one's (float32).

    python benchmarks/dtype_answers.py --dtypes float32,int8 --lengths 4000,8000 --depths 0.2,0.5,0.8 \
        --haystack /path/to/held-out.jsonl

`int8:torch` is `--dtype int8` with its decode products on torch's int8 kernel instead of
kvcli's (kvcli/models/int8_kernel.py), e.g. `--dtypes int8:torch,int8,float32`.

Every needle document (the facts of benchmarks/skim_filter.py hidden in held-out prose:
`--haystack`, default pydoc topics) is read by each dtype's model through `reading.policy.choose`,
as `kvcli ask` reads it, with the default method and ratio, and answered greedily. The table gives,
per dtype, right answers (the answer holds the fact's), answers equal to the first dtype's word for
word, and the median prefill seconds (comparable only within one quiet run).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from unittest import mock

from kvcli.methods import DEFAULT_METHOD, Budget, make_method
from kvcli.models import int8_kernel, load_model
from kvcli.reading import Options, Reader, answer
from kvcli.reading.policy import choose
from skim_filter import AnswerTally, haystack_text, needle_documents  # benchmarks/ is on sys.path when a script in it runs


TORCH_KERNEL = ":torch"


def kernel_name(dtype: str) -> str:
    return int8_kernel.TORCH if dtype.endswith(TORCH_KERNEL) else int8_kernel.name()


def on_kernel(dtype: str):
    """Within the block, `int8:torch` multiplies on torch's int8 kernel (kvcli's declines every product)."""
    return mock.patch.object(int8_kernel, "rows_product", lambda *args: None) if dtype.endswith(TORCH_KERNEL) else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--dtypes", default="float32,int8", help="kvcli --dtype values; the first is the reference")
    parser.add_argument("--haystack", default=None)
    parser.add_argument("--lengths", default="4000,8000")
    parser.add_argument("--depths", default="0.2,0.5,0.8")
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    readers = {dtype: Reader(load_model(args.model, dtype=dtype.removesuffix(TORCH_KERNEL), device="cpu")) for dtype in dtypes}
    first = readers[dtypes[0]]
    text = haystack_text(args.haystack)
    tally = AnswerTally(dtypes)
    options = Options(budget=Budget(), max_new_tokens=args.max_new_tokens)
    lengths, depths = [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")]
    for length, depth, row, _, question, expected in needle_documents(text, lengths, depths, first.tokenizer, seed=1):
        tally.case()
        for dtype, reader in readers.items():
            method = make_method(args.method)
            with on_kernel(dtype):
                reading = choose(reader, row.context, options, method, [question]).read(question, method)
                said = answer(reader, reading, options).text
            tally.add(dtype, said, expected, reading.state.seconds)
            print(f"{length} {depth} {dtype}: {reading.state.seconds:.1f}s {said[:70]!r}", file=sys.stderr, flush=True)
    print(f"model {first.lm.name}; method {args.method} at the default ratio; {tally.cases} needle documents "
          f"({args.lengths} tokens x depths {args.depths}); haystack {args.haystack or 'pydoc topics'}")
    print(f"| --dtype | loaded as | right | same answer as {dtypes[0]} | median prefill s |")
    print("| --- | --- | --- | --- | --- |")
    for dtype, reader in readers.items():
        loaded = reader.lm.precision + (f", {kernel_name(dtype)}'s int8 kernel" if reader.lm.weights == "int8" else "")
        print(f"| {dtype} | {loaded} | {tally.right[dtype]}/{tally.cases} | {tally.same[dtype]}/{tally.cases} "
              f"| {statistics.median(tally.seconds[dtype]):.1f} |")


if __name__ == "__main__":
    main()
