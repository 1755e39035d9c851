"""What a decode step's cache work costs when a layer's KV heads hold different numbers of entries.

    python benchmarks/packed_step.py                     # the default model's shapes, one thread
    python benchmarks/packed_step.py --kv-heads 8 --heads 32 --head-dim 128 --kept 2000

For one layer of the given shape, a decode step's append (`KVLayer.append`) and attention
(`attention.attend` on a dense layer, `attention.attend_packed` on a packed one: what
`kvcli_attention` calls) are timed for the same mean tokens per KV head: every head equal (the
dense layout), and two packed layouts, heads spread as the adaptive and the global splits spread
them in docs/results.md's decode runs (fewest ~0.4x and ~0.25x the mean). Rounds alternate the
layouts; the median over rounds of each layout's mean step is printed, and its ratio to the
dense layout's. Only the cache's share of a step: the model's weights, the larger share, are
the same for every layout. Packed layers' steps are attended by kvcli's kernel where it runs
(kvcli/decode_kernel.py; `KVCLI_ATTENTION_KERNEL=sdpa` for SDPA per KV head, as before it). Run it
alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcli import decode_kernel  # noqa: E402
from kvcli.attention import LayerAttention, attend, attend_packed  # noqa: E402
from kvcli.cache import KVLayer  # noqa: E402


def head_lengths(kind: str, kv_heads: int, kept: int) -> list[int]:
    """Each KV head's entries for a layout with a mean of `kept` per head."""
    if kind == "dense":
        return [kept] * kv_heads
    low = {"adaptive": 0.4, "global": 0.25}[kind] * kept
    if kv_heads == 1:
        return [kept]
    # from `low` up, evenly spaced, the mean kept exact
    lengths = [round(low + (2 * kept - 2 * low) * h / (kv_heads - 1)) for h in range(kv_heads)]
    lengths[-1] += kept * kv_heads - sum(lengths)
    return lengths


def make_layer(lengths: list[int], head_dim: int, room: int, dtype: torch.dtype) -> KVLayer:
    gen = torch.Generator().manual_seed(0)
    layer = KVLayer()
    layer.load_heads([torch.randn(1, 1, n, head_dim, generator=gen).to(dtype) for n in lengths],
                     [torch.randn(1, 1, n, head_dim, generator=gen).to(dtype) for n in lengths],
                     [torch.arange(n) for n in lengths])
    layer.reserve_more(room)  # as `KVCache.reserve` before decoding a known number of tokens
    return layer


def step_seconds(layer: KVLayer, steps: int, heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """Mean seconds of `steps` decode steps' append and attention on `layer`."""
    kv_heads = layer.num_kv_heads
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(steps, 1, heads, 1, head_dim, generator=gen).to(dtype)
    keys = torch.randn(steps, 1, kv_heads, 1, head_dim, generator=gen).to(dtype)
    values = torch.randn(steps, 1, kv_heads, 1, head_dim, generator=gen).to(dtype)
    positions = torch.arange(100_000, 100_000 + steps)[:, None]
    attn = LayerAttention(scaling=head_dim**-0.5)
    began = time.perf_counter()
    for i in range(steps):
        layer.append(keys[i], values[i], positions[i])
        if layer.packed:
            attend_packed(queries[i], layer, attn)
        else:
            attend(queries[i], *layer.view(), attn)
    return (time.perf_counter() - began) / steps


def packed_attention(dtype: torch.dtype, head_dim: int) -> str:
    """What attends the packed layouts' steps here (what `decode_kernel.attend_pool` takes)."""
    if decode_kernel.name() != decode_kernel.KVCLI:
        return f"sdpa per KV head ({decode_kernel.why_not()})"
    if not decode_kernel.takes(dtype, head_dim, head_dim):
        return "sdpa per KV head (kvcli's kernel takes bfloat16 caches with head dims a multiple of 32)"
    return "kvcli's kernel, one call per layer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-heads", type=int, default=2, help="KV heads per layer (Qwen2.5-0.5B: 2)")
    parser.add_argument("--heads", type=int, default=14, help="query heads per layer (Qwen2.5-0.5B: 14)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kept", type=int, default=230, help="mean entries per KV head (the decode runs': 230 at ratio 0.05)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per round (the decode runs': 64)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kinds = ("dense", "adaptive", "global")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            layer = make_layer(head_lengths(kind, args.kv_heads, args.kept), args.head_dim, args.steps, dtype)
            times[kind].append(step_seconds(layer, args.steps, args.heads, args.head_dim, dtype))
    dense = statistics.median(times["dense"])
    print(f"{args.kv_heads} KV heads, {args.heads} query heads, head dim {args.head_dim}, {args.kept} entries per KV head on average, "
          f"{args.dtype}, {args.threads} thread(s); median of {args.rounds} rounds of {args.steps} steps")
    print(f"packed layers attended by {packed_attention(dtype, args.head_dim)}; dense layers by sdpa")
    for kind in kinds:
        median = statistics.median(times[kind])
        lengths = head_lengths(kind, args.kv_heads, args.kept)
        print(f"{kind:9s} heads {min(lengths)}-{max(lengths)}: {1e6 * median:7.1f} us per layer and step ({median / dense:.2f}x dense)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
