"""What `--sources` costs per answer: the same decode from copies of one cache, without and with the watch.

    python benchmarks/sources_cost.py [-m qwen2.5-coder-0.5b] [--tokens 4000] [--new-tokens 64] [--repeats 3]

Reads one needle document (CPython's reference prose, `pydoc_data.topics`) as `kvcli ask` does
(the default method and ratio), then decodes `--new-tokens` tokens (EOS ignored) from a copy of
the cache, alternately plain and watched, `--repeats` times each; prints the median seconds per
decoded token of each, the watch's extra time per token, and that against the whole answer
(the read plus the plain decode). On a busy machine the two decodes' difference is mostly
noise, so it also times the watch alone: its work for one decoded token (every layer's
`observe`, a random query of the model's shape) over the read's own cache, 50 times.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pydoc_data.topics import topics

    from kvcli.defaults import DEFAULT_METHOD
    from kvcli.eval import niah_rows
    from kvcli.generate import decode
    from kvcli.methods import make_method
    from kvcli.models import load_model
    from kvcli.reading import Options, Reader
    from kvcli.reading.cite import watcher
    from kvcli.reading.policy import choose

    reader = Reader(load_model(args.model))
    question = "What is the secret passphrase for the vault?"
    haystack = "\n\n".join(topics[name] for name in sorted(topics)[20:80])
    (row,) = niah_rows(haystack, "The secret passphrase for the vault is indigo-walrus-17.", question, "indigo", [args.tokens], [0.5], reader.tokenizer)
    options = Options(max_new_tokens=args.new_tokens)
    method = make_method(DEFAULT_METHOD)
    reading = choose(reader, row.context, options, method, [question]).read(question, method)
    reader.profile()  # loaded once, as a run with --sources loads it before reading

    def timed(watch: bool) -> float:
        state = dataclasses.replace(reading.state, cache=reading.state.cache.clone())
        copy = dataclasses.replace(reading, state=state)
        began = time.perf_counter()
        with reader.decoding():
            n = sum(1 for _ in decode(reader.model, state, args.new_tokens, set(), options.sampling, watcher(reader, copy) if watch else None))
        return (time.perf_counter() - began) / n

    plain, watched = [], []
    for _ in range(args.repeats):
        plain.append(timed(False))
        watched.append(timed(True))
    p, w = statistics.median(plain), statistics.median(watched)
    import torch

    from kvcli.attention import LayerAttention

    config = reader.model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    query = torch.randn(1, config.num_attention_heads, 1, head_dim, device=reader.device, dtype=reader.lm.dtype)
    watch = watcher(reader, reading)
    layers = range(reader.num_layers)
    with reader.decoding():
        began = time.perf_counter()
        for _ in range(50):
            for layer in layers:
                watch.observe(layer, query, reading.state.cache, LayerAttention(head_dim ** -0.5))
        alone = (time.perf_counter() - began) / 50
    whole = reading.state.seconds + p * args.new_tokens
    print(f"{reader.lm.name}, {reading.state.prompt_len} prompt tokens, {method.name} default ratio, {args.new_tokens} tokens decoded, median of {args.repeats}")
    print(f"plain {1000 * p:.1f} ms/token, watched {1000 * w:.1f} ms/token: +{1000 * (w - p):.1f} ms/token (+{100 * (w - p) / p:.1f}% of decoding); "
          f"+{100 * (w - p) * args.new_tokens / whole:.1f}% of the whole answer (read {reading.state.seconds:.1f}s + decode)")
    print(f"the watch alone: {1000 * alone:.2f} ms per decoded token ({100 * alone / p:.1f}% of a plain decode step)")


if __name__ == "__main__":
    main()
