"""What measuring each token's surprisal (`--param surprisal`, kvcli/repeat.py) costs: time, and how
far it raises the process's peak memory, for each way of reading the output layer.

    python benchmarks/surprisal_block.py [--length 4600] [--ways sliced,whole:512,whole:128] [--threads 1]

The default model is loaded as `kvcli` loads it (int8 weights under bfloat16 on this CPU), the first
--length tokens of samples/python_exceptions.txt are read in one prefill with the decoder watched (as
`repeat_prefix` does), and `token_surprisal` runs over its hidden states once per way, in turn,
--rounds times. Ways: `sliced` (kvcli's: the output layer read in slices of vocabulary rows, each
widened once; `sliced:B` with B positions per product) and `whole:B` (the output layer called
whole on B positions at a time, as session 19's code did with B = 512; an int8 head widens its
whole weight on each call). Per run: seconds, the process's peak resident memory above what it held
before the run (the peak is reset first: /proc/self/clear_refs), and the largest difference from
the first way's surprisal (the same numbers up to the order of float sums).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--length", type=int, default=4600)
    parser.add_argument("--ways", default="sliced,whole:512,whole:128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from kvcli.generate import prefill, prepare_model
    from kvcli.models import load_model
    import kvcli.repeat
    from kvcli.repeat import _decoder_outputs, token_surprisal
    from kvcli.stats import current_memory_bytes, peak_memory_bytes, reset_peak_memory

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model, tokenizer = lm.model, lm.tokenizer
    text = (ROOT / "samples" / "python_exceptions.txt").read_text()
    ids = torch.tensor([tokenizer(text)["input_ids"][: args.length]])
    prepare_model(model)
    with _decoder_outputs(model) as seen:
        prefill(model, ids)
    hidden = seen[0]
    device = torch.device("cpu")
    print(f"{ids.shape[1]} tokens, hidden {tuple(hidden.shape)} {hidden.dtype}, "
          f"{args.threads} thread(s)")
    sliced = kvcli.repeat._head_rows
    first = None
    for round_index in range(args.rounds):
        for way in args.ways.split(","):
            kind, _, block = way.partition(":")
            kvcli.repeat._head_rows = sliced if kind == "sliced" else (lambda head: None)
            gc.collect()
            before = current_memory_bytes(device)
            reset_peak_memory(device)
            started = time.perf_counter()
            surprisal = token_surprisal(model, ids, hidden, block=int(block) if block else None)
            seconds = time.perf_counter() - started
            above = peak_memory_bytes(device) - before
            first = surprisal if first is None else first
            diff = float((surprisal - first).abs().max())
            print(f"round {round_index + 1}  {way:>10}  {seconds:6.2f} s  peak +{above / 2**20:7.1f} MiB  "
                  f"max |diff| {diff:.2e}  mean {float(surprisal.mean()):.3f} nats", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
