"""Per-head budgets on the question-agnostic ten-fact document: equal vs adaptive vs global split.

    python benchmarks/head_split.py -m qwen2.5-coder-0.5b --length 3000 --ratios 0.1,0.2,0.3 --json head_split.json
    python benchmarks/head_split.py --settings snapkv:global,snapkv:global:0.2,dynamickv:adaptive:0.2:kernel_size=1
    python benchmarks/head_split.py --pydoc --length 4000 --settings evidencekv:equal,dynamickv:adaptive:0.2:kernel_size=1
    python benchmarks/head_split.py --haystack ../shared/data/leval/financial_qa.rows.jsonl --length 4000 --query-aware evidencekv

One document of real prose with the ten facts of benchmarks/reuse_check.py hidden at evenly
spread depths (the rows of docs/results.md's repeat-scorer section) is read once with the full
cache and scored once by the repeat scorer (kvcli/repeat.py, as `kvcli compress` does by
default). Every (method, `head_split`, ratio) cache is derived from that one repeat, and each of
the ten questions is asked after it (greedy, `--max-new-tokens`), as `kvcli compress` + `kvcli ask
--cache` would; a fact is found when the answer holds its expected word as a word (the
treasurer's "tin" is not found in "meeting", as the plain contains metric of earlier runs found it; decoding stops
there: the greedy tokens after it cannot unfind it). The full reused
prefix answers the same questions for reference. Per setting it also reports the KV bytes kept,
the fewest and most tokens one head kept, and the decode rate (tokens/s over the ten answers;
one run on a shared CPU: read it as a ratio between settings of the same run).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from reuse_check import FACTS, build_document, hide_facts  # benchmarks/ is on sys.path when a script in it runs

DEFAULT_SETTINGS = "snapkv:equal,snapkv:adaptive,snapkv:global,dynamickv:equal,dynamickv:adaptive,evidencekv:equal"


def parse_settings(text: str) -> list[tuple[str, str, float, dict[str, str]]]:
    """`"snapkv:global:0.2:kernel_size=31,evidencekv:equal"` -> [("snapkv", "global", 0.2,
    {"kernel_size": "31"}), ("evidencekv", "equal", 0.0, {})]: method, `head_split`, `head_floor`
    (default 0) and any other knobs as KEY=VALUE (`kvcli methods` lists them)."""
    from kvcli.methods import parse_params

    settings = []
    for item in text.split(","):
        name, *rest = item.strip().split(":")
        knobs = parse_params([part for part in rest if "=" in part])
        split, floor, *_ = [part for part in rest if "=" not in part] + ["", ""]
        settings.append((name, split or "equal", float(floor or 0.0), knobs))
    return settings


def holds(answer: str, expected: str) -> bool:
    """Whether `answer` has `expected` as a word of its own (any case)."""
    return re.search(rf"(?<![a-z0-9]){re.escape(expected.lower())}(?![a-z0-9])", answer.lower()) is not None


def label_of(name: str, split: str, floor: float, knobs: dict[str, str] | None = None) -> str:
    return f"{name}:{split}" + (f", floor {floor:g}" if floor else "") + "".join(f", {k}={v}" for k, v in (knobs or {}).items())


def query_aware_found(reader, document: str, facts, method_name: str, ratios: list[float], max_new_tokens: int) -> dict[float, list[bool]]:
    """Per ratio, which facts a query-aware read of `document` finds (`kvcli ask --ratio R
    --method M`, one prefill per question): the issue's reference for a question-agnostic cache.
    Each question's prefill is captured once and every ratio derived from it (the same cache)."""
    from kvcli.methods import Budget, make_method
    from kvcli.reading import Options, QueryAware, answer

    options = Options(max_new_tokens=max_new_tokens)
    method = make_method(method_name)
    mode = QueryAware(reader, document, options)
    found: dict[float, list[bool]] = {ratio: [] for ratio in ratios}
    for _, question, expected in facts:
        captured = mode.capture(question, method.window_size, method.needs_accumulated)
        for ratio in ratios:
            text = answer(reader, mode.derive(captured, question, method, Budget(ratio=ratio)), options).text
            found[ratio].append(holds(text, expected))
    return found


def run(reader, document: str, facts, settings: list[tuple[str, str]], ratios: list[float], max_new_tokens: int,
        on_row=None) -> dict:
    """Every setting at every ratio, from one repeat of `document`; the full reused prefix first."""
    from kvcli.generate import decode
    from kvcli.methods import Budget, apply_params, make_method
    from kvcli.reading import Options, Reused

    options = Options(max_new_tokens=max_new_tokens)
    mode = Reused(reader, document, options, scorer="repeat")
    started = time.perf_counter()
    # the surprisal measured at once if a setting weighs by it (as `kvcli compress` does), else never
    repeated = mode.repeat(surprisal=any(float(knobs.get("surprisal", 0)) for *_, knobs in settings))
    rows = []

    def ask_all(label: str, method, split: str, ratio: float | None) -> None:
        prefix = mode.derive(repeated, method, Budget(ratio=ratio) if ratio is not None else Budget(ratio=1.0))
        prefix.charged = True
        cache = prefix.state.cache
        lengths = [n for layer in cache.head_lengths() for n in layer]
        answers, tokens, decode_s = [], 0, 0.0
        for _, question, expected in facts:
            state = prefix.ask(reader, question, options).state
            out: list[int] = []
            text = ""
            with reader.decoding():
                steps = decode(reader.model, state, max_new_tokens, reader.eos_ids)
                out.append(next(steps, None))  # from the question's prefill: not a decode step
                started_decode = time.perf_counter()
                while out[-1] is not None and not holds(text := reader.tokenizer.decode(out), expected):
                    out.append(next(steps, None))
                if out[-1] is None:
                    out.pop()
                    text = reader.tokenizer.decode(out)
                decode_s += time.perf_counter() - started_decode
            tokens += max(0, len(out) - 1)
            answers.append(text.strip())
        found = [holds(text, expected) for text, (_, _, expected) in zip(answers, facts)]
        row = {
            "setting": label, "method": method.name, "head_split": split, "head_floor": method.head_floor, "ratio": ratio,
            "found": sum(found), "found_facts": found,
            "kv_bytes_kept": cache.nbytes(), "head_min": min(lengths), "head_max": max(lengths),
            "packed_layers": sum(layer.packed for layer in cache.layers),
            "decode_tokens_per_s": round(tokens / decode_s, 2) if decode_s > 0 else None, "answers": answers,
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)

    ask_all("full (reused prefix)", make_method("full"), "equal", None)
    for ratio in ratios:
        for name, split, floor, knobs in settings:
            method = apply_params(make_method(name, head_split=split, head_floor=floor), knobs, strict=True)
            ask_all(label_of(name, split, floor, knobs), method, split, ratio)
    return {
        "prompt_tokens": mode.prompt.prefix_len, "repeat_prefill_s": round(repeated.state.seconds, 1),
        "repeat_s": round(repeated.repeat_s, 1), "total_s": round(time.perf_counter() - started, 1),
        "kv_bytes_full": repeated.state.cache.nbytes(), "rows": rows,
    }


def table(result: dict, ratios: list[float]) -> str:
    """Markdown: facts found per setting and ratio, with the head spread and decode rate."""
    by = {(row["setting"], row["ratio"]): row for row in result["rows"]}
    labels = list(dict.fromkeys(row["setting"] for row in result["rows"] if row["ratio"] is not None))
    full = next(row for row in result["rows"] if row["ratio"] is None)
    head = f"| facts found of {len(full['answers'])} (tokens per head, fewest-most; decode tokens/s) | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |"
    lines = [head, "| --- |" + " --- |" * len(ratios),
             "| the full reused prefix | " + " | ".join(f"{full['found']}" for _ in ratios) + " |"]
    if result.get("query_aware"):
        asked = result["query_aware"]
        lines.append(f"| query-aware reads (`kvcli ask --ratio R --method {asked['method']}`) | "
                     + " | ".join(str(sum(asked["found"][str(r)])) for r in ratios) + " |")
    for label in labels:
        cells = []
        for ratio in ratios:
            row = by[(label, ratio)]
            of = ""
            if result.get("query_aware"):
                asked = result["query_aware"]["found"][str(ratio)]
                of = f" [{sum(a and b for a, b in zip(asked, row['found_facts']))} of {sum(asked)}]"
            cells.append(f"{row['found']}{of} ({row['head_min']}-{row['head_max']}; {row['decode_tokens_per_s']})")
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="model (default: kvcli's embedded default)")
    parser.add_argument("--length", type=int, default=3000, help="document tokens before the facts (reuse_check's)")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="METHOD:SPLIT[:FLOOR][:KEY=VALUE...],... (split: equal, adaptive, global, profile; FLOOR: --param head_floor; KEY=VALUE: another knob)")
    parser.add_argument("--pydoc", action="store_true",
                        help="hide the ten facts in CPython's pydoc topics (prose kvcli was not tuned on) instead of samples/haystack.txt")
    parser.add_argument("--haystack", default=None, metavar="ROWS.jsonl[:N]",
                        help="hide the ten facts in row N (default 0) of a rows file's `context` (an L-Eval set of ../shared/data: "
                             "real documents no setting was chosen on), its first --length tokens, instead of samples/haystack.txt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--query-aware", default=None, metavar="METHOD",
                        help="also ask each question in a query-aware read at each ratio with METHOD (evidencekv: kvcli ask's default); "
                             "the table then gives each setting's facts found [of those the query-aware read found]")
    parser.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args(argv)

    from kvcli.models import load_model
    from kvcli.reading import Reader

    lm = load_model(args.model)
    reader = Reader(lm)
    if args.pydoc or args.haystack:
        if args.haystack:
            path, _, row = args.haystack.partition(":")
            rows = Path(path).read_text(encoding="utf-8").splitlines()
            text = json.loads(rows[int(row or 0)])["context"]
        else:
            from skim_filter import haystack_text

            text = haystack_text(None)
        ids = lm.tokenizer(text[: args.length * 8], add_special_tokens=False)["input_ids"][: args.length]
        if len(ids) < args.length:
            print(f"the haystack holds {len(ids):,} tokens, fewer than --length {args.length:,}", file=sys.stderr)
        document = hide_facts(lm.tokenizer.decode(ids), FACTS)
    else:
        document = build_document(lm.tokenizer, args.length)
    ratios = [float(r) for r in args.ratios.split(",")]

    def show(row: dict) -> None:
        print(f"{row['setting']} @ {row['ratio']}: {row['found']}/{len(row['answers'])}, heads {row['head_min']}-{row['head_max']}, "
              f"{row['kv_bytes_kept']:,} B, {row['decode_tokens_per_s']} tok/s", file=sys.stderr, flush=True)

    result = run(reader, document, FACTS, parse_settings(args.settings), ratios, args.max_new_tokens, on_row=show)
    if args.query_aware:
        found = query_aware_found(reader, document, FACTS, args.query_aware, ratios, args.max_new_tokens)
        result["query_aware"] = {"method": args.query_aware, "found": {str(r): f for r, f in found.items()}}
        print(f"query-aware ({args.query_aware}): " + ", ".join(f"{r:g}: {sum(f)}/{len(f)}" for r, f in found.items()), file=sys.stderr, flush=True)
    result.update(model=lm.name, length=args.length, max_new_tokens=args.max_new_tokens, haystack=args.haystack or ("pydoc topics" if args.pydoc else "samples/haystack.txt"))
    print(table(result, ratios))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
