"""DynamicKV's interim re-divisions: the whole model's budget to the layers seen so far, or their own part.

    python benchmarks/dynamickv_rules.py -m qwen2.5-coder-0.5b --length 2000 --budgets 64,128

One needle prompt (a fact at half depth in samples/haystack.txt, asked for at the end) is
captured once; for each budget both `interim_budget` rules are replayed over the capture. For
each rule it prints the tokens every layer keeps in the end, the fewest and most, how many
layers an interim re-division left with less than the last re-division would have given them
(their final share is cut to what they still hold), and the most entries the layers seen so
far held at once during the read (summed over layers, mean over KV heads: the KV the prefill
holds beyond the layer being computed).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from kvcli.eval import niah_rows
from kvcli.methods import Budget, make_method
from kvcli.methods.allocation import allocate
from kvcli.models import load_model
from kvcli.reading import Options, QueryAware, Reader
from reuse_check import FACTS  # benchmarks/ is on sys.path when a script in it runs

RULES = ("model", "seen")


def replay(captured, compression) -> tuple[list[int], int, object]:
    """Derive the cache step by step as a live read would; final kept per layer, most held, compressor."""
    cache = captured.cache.clone()
    compressor = compression.compressor()
    most = 0
    for seen, obs in enumerate(captured.observations, start=1):
        compressor.prune(cache, obs)
        most = max(most, sum(layer.length for layer in cache.layers[:seen]))
    return cache.retained_per_layer(), most, compressor


def cut_short(compressor, prompt_len: int) -> tuple[int, int]:
    """Layers left by interim trims with less than a single re-division at the last layer would
    give them (same counts, floors and candidate caps), and the tokens they lost to other layers."""
    method = compressor.method
    final = compressor.allocations[-1]
    cap = min(math.ceil(method.max_multiple * compressor.average), prompt_len - method.window_size)
    floor = math.ceil(method.min_multiple * compressor.average)
    single = allocate(compressor.shared_total, compressor.counts[-1], [cap] * len(final), [floor] * len(final))
    short = [s - f for f, s in zip(final, single) if f < s]
    return len(short), sum(short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--length", type=int, default=2000, help="prompt length in model tokens")
    parser.add_argument("--budgets", default="64,128", help="tokens per layer, comma-separated")
    args = parser.parse_args()

    reader = Reader(load_model(args.model))
    haystack = (Path(__file__).resolve().parent.parent / "samples" / "haystack.txt").read_text()
    fact, question, expected = FACTS[0]
    row = niah_rows(haystack, fact, question, expected, [args.length], [0.5], reader.tokenizer)[0]
    document = QueryAware(reader, row.context, Options())
    method = make_method("dynamickv")
    captured = document.capture(question, method.window_size)
    print(f"{reader.lm.name}, {captured.prompt_len}-token prompt, {len(captured.observations)} layers")
    for level in (int(b) for b in args.budgets.split(",")):
        for rule in RULES:
            variant = make_method("dynamickv", interim_budget=rule)
            compression, _ = reader.compression(variant, Budget(tokens=level), captured.prompt_len)
            kept, most, compressor = replay(captured, compression)
            short, lost = cut_short(compressor, captured.prompt_len)
            print(f"budget {level} interim_budget={rule}: total {sum(kept)} (plan {compression.plan.total}), "
                  f"fewest {min(kept)}, most {max(kept)}; {short} layers kept {lost} tokens fewer than one division "
                  f"at the last layer would give them; most entries held at once {most}")
            print(f"  kept per layer: {' '.join(map(str, kept))}")


if __name__ == "__main__":
    main()
