"""How close `kvcli plan`'s read-time estimate comes to the reads it estimates.

Loads a model once and reads the start of a document at several lengths, query-aware at the
default method and ratio, as `kvcli ask` does. Before each read it asks the speed record (kept
in a temporary file, not the user's `KVCLI_HOME`) what `plan` would estimate, then records the
read as `ask` does. The table gives, per read, the tokens, the estimate, the measured prefill
and their ratio; the first read has no estimate (nothing recorded yet).

    python benchmarks/plan_estimate.py --model smollm2-135m --lengths 1000,2000,4000,1000,4000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

QUESTION = "Which PEP describes the with statement?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--document", default="samples/python_exceptions.txt")
    parser.add_argument("--lengths", default="1000,2000,4000,1000,4000", help="prompt tokens of each read, in order")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the answer's room, as ask keeps it (the read itself answers nothing)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    from kvcli.cli.options import RunOptions
    from kvcli.models import load_model
    from kvcli.reading import QueryAware, Reader
    from kvcli.speed import measured_speed, names, record_read

    lm = load_model(args.model)
    reader = Reader(lm)
    run = RunOptions(model=args.model, max_new_tokens=args.max_new_tokens)
    method, options = run.make_method(), run.options()
    ids = reader.tokenizer(Path(args.document).read_text())["input_ids"]
    home = Path(tempfile.mkdtemp(prefix="kvcli-speed-"))
    device, dtype = names(lm.device, lm.dtype)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        text = reader.tokenizer.decode(ids[:length])
        mode = QueryAware(reader, text, options)
        tokens = len(mode.prompt(QUESTION))
        speed = measured_speed(home, lm.name, device, dtype)
        estimate = speed.seconds(tokens) if speed else None
        reading = mode.read(QUESTION, method)
        seconds = reading.state.seconds
        record_read(home, lm.name, device, dtype, reading.state.prompt_len, seconds)
        rows.append({"tokens": tokens, "estimate_s": estimate, "read_s": seconds, "based_on": speed.reads if speed else 0})
        ratio = f"{estimate / seconds:.2f}" if estimate else "-"
        shown = f"{estimate:.2f}" if estimate else "-"
        print(f"| {tokens:,} | {rows[-1]['based_on']} | {shown} | {seconds:.2f} | {ratio} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": lm.name, "device": device, "dtype": dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
