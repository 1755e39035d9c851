"""Where a decode step's time goes: torch.profiler over N decode steps on a compressed cache.

Prefills one prompt of real prose with a method at a ratio, then profiles `--steps` decode
steps and prints the operators that took the most time (self time, so nested calls are not
counted twice), with their share of the profiled wall time.

    python benchmarks/profile_decode.py --model smollm2-135m --length 500 --steps 16 --threads 1
    python benchmarks/profile_decode.py --method snapkv --param head_split=adaptive --length 4600 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="embedded name, checkpoint folder, .gguf or hub id (default: kvcli's default model)")
    parser.add_argument("--length", type=int, default=2000, help="prompt length in tokens (default 2000)")
    parser.add_argument("--method", default="dynamickv", help="kvcli method (default dynamickv)")
    parser.add_argument("--ratio", type=float, default=0.05, help="fraction of the KV kept (default 0.05)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a knob of the method, as kvcli's --param (repeatable)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled (default 32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's default here)")
    parser.add_argument("--dtype", default="auto", help="kvcli --dtype: auto, int8, float32, bfloat16 (default auto)")
    parser.add_argument("--top", type=int, default=20, help="operators listed (default 20)")
    parser.add_argument("--trace", metavar="OUT", default=None, help="also write a Chrome trace (open in Perfetto)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")

    from bench import prose_ids  # the script's own folder is on sys.path when run as a script

    from kvcli.generate import decode, prefill
    from kvcli.methods import Budget, configure
    from kvcli.models import DEFAULT_MODEL, load_model
    from kvcli.reading import Reader
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    reader = Reader(load_model(args.model or DEFAULT_MODEL, device="cpu", dtype=args.dtype))
    method = configure([args.method], args.param)[0]
    ids = prose_ids(reader.tokenizer, args.length)
    compression, _ = reader.compression(method, Budget(ratio=args.ratio), args.length)  # None: the full cache

    # A short unprofiled decode first, so one-time initialisation is not what gets listed.
    warm = prefill(reader.model, ids[:, :64])
    list(decode(reader.model, warm, 4, set()))
    state = prefill(reader.model, ids, compression)
    steps = iter(decode(reader.model, state, args.steps + 1, set()))
    next(steps)  # the first token comes from the prefill's logits
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in steps:
            pass
        wall = time.perf_counter() - started

    kept = state.cache.nbytes() / 2**20
    print(f"{args.method}{'(' + ','.join(args.param) + ')' if args.param else ''}@{args.ratio:g} on {args.length} tokens ({kept:.1f} MiB KV kept), {args.steps} steps, {args.threads} thread(s): "
          f"{args.steps / wall:.2f} tokens/s, {1000 * wall / args.steps:.1f} ms per step under the profiler")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = wall * 1e6
    print(f"{'operator':<44}{'calls/step':>11}{'self ms/step':>14}{'share':>8}")
    for event in events[: args.top]:
        print(f"{event.key[:43]:<44}{event.count / args.steps:>11.1f}{event.self_cpu_time_total / 1000 / args.steps:>14.3f}{event.self_cpu_time_total / total_us:>8.1%}")
    listed = sum(e.self_cpu_time_total for e in events)
    print(f"{'(all operators)':<44}{'':>11}{listed / 1000 / args.steps:>14.3f}{listed / total_us:>8.1%}  the rest is Python between operators")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
