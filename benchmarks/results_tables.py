"""Markdown tables for docs/results.md from `kvcli eval -o FILE.json` and `benchmarks/bench.py --json` files.

    python benchmarks/results_tables.py results/niah-qwen2.5-coder-0.5b.json [...]
    python benchmarks/results_tables.py results/bench-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _row_name(entry: dict) -> str:
    """The method, with how the prompt was read unless query-aware (eval --modes)."""
    mode = entry.get("mode", "query")
    if mode == "chunked":
        return f"{entry['method']} (chunked {entry.get('chunk_size')})"
    return entry["method"] if mode == "query" else f"{entry['method']} ({mode})"


def table(result: dict) -> str:
    """Mean score per method and mode (rows) x budget (columns), with % of full in brackets."""
    summary = result["summary"]
    levels = sorted({s["budget"] or s["ratio"] for s in summary if s["method"] != "full"})
    key = "budget" if any(s["budget"] for s in summary) else "ratio"
    head = "| method | " + " | ".join(f"{key} {level}" for level in levels) + " |"
    lines = [head, "| --- " * (len(levels) + 1) + "|"]
    for full in (s for s in summary if s["method"] == "full"):
        lines.append(f"| {_row_name(full)} | {full['score']:.3f} (n={full['n']})" + " |" * len(levels))
    by_method = defaultdict(dict)
    for s in summary:
        if s["method"] != "full":
            by_method[_row_name(s)][s["budget"] or s["ratio"]] = s
    for method, cells in by_method.items():
        row = []
        for level in levels:
            s = cells.get(level)
            if s is None:
                row.append("-")
            else:
                pct = f" ({s['pct_of_full']:.0f}%)" if s.get("pct_of_full") is not None else ""
                row.append(f"{s['score']:.3f}{pct}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def niah_by_length(result: dict) -> str:
    """NIAH: score per method x budget at each prompt length (mean over depths)."""
    grids = result.get("niah") or []
    if not grids:
        return ""
    lengths = grids[0]["lengths"]
    mean = lambda rows: " | ".join(f"{sum(r) / len(r):.2f}" for r in rows)  # noqa: E731
    lines = ["| method | budget | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "| --- " * (len(lengths) + 2) + "|"]
    lines += [f"| full | - | {mean(g['scores'])} |" for g in grids if g["method"] == "full"]
    for level in sorted({g["budget"] for g in grids if g["budget"]}):
        lines += [f"| {g['method']} | {level} | {mean(g['scores'])} |" for g in grids if g["budget"] == level]
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def bench_table(result: dict, target_ratio: float = 0.05) -> str:
    """bench.py: per prompt length, the decode rates and the ratios its targets are stated on."""
    rows = [r for r in result["rows"] if r.get("error") is None]
    lengths = sorted({r["length"] for r in rows})
    at = {(r["length"], r["method"], r["ratio"]): r for r in rows}
    lines = ["| | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |", "| --- " * (len(lengths) + 1) + "|"]

    def line(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(n) for n in lengths) + " |")

    def d(n, method, ratio, key):
        r = at.get((n, method, ratio))
        return None if r is None else (r["derived"].get(key) if key in r["derived"] else r.get(key))

    line("`generate` decode (tokens/s)", lambda n: f"{d(n, 'generate', None, 'decode_tokens_per_s'):.2f}")
    line("kvcli `full` decode", lambda n: f"{d(n, 'full', None, 'decode_tokens_per_s'):.2f} ({d(n, 'full', None, 'decode_vs_generate'):.2f}x generate)")
    line(f"`dynamickv`@{target_ratio:g} decode", lambda n: (
        f"{d(n, 'dynamickv', target_ratio, 'decode_tokens_per_s'):.2f} ({d(n, 'dynamickv', target_ratio, 'decode_vs_generate'):.2f}x generate, "
        f"{d(n, 'dynamickv', target_ratio, 'decode_vs_bound'):.2f}x bound, {d(n, 'dynamickv', target_ratio, 'decode_vs_matvec'):.2f}x matvec)"))
    line("bandwidth bound / matvec ceiling (tokens/s)", lambda n: (
        f"{d(n, 'dynamickv', target_ratio, 'bound_tokens_per_s'):.1f} / {d(n, 'dynamickv', target_ratio, 'matvec_tokens_per_s'):.1f} "
        f"({d(n, 'dynamickv', target_ratio, 'matvec_vs_bound'):.2f}x)"))

    def span(n, method, key):
        return _span([r["derived"][key] for r in rows if r["length"] == n and r["method"] == method and r["derived"].get(key) is not None])

    line("`dynamickv` decode vs generate (ratios 0.02-0.2)", lambda n: span(n, "dynamickv", "decode_vs_generate"))
    line("`dynamickv` prefill vs `full`", lambda n: span(n, "dynamickv", "prefill_vs_full"))
    line("`snapkv` prefill vs `full` (same work but scoring: the noise)", lambda n: span(n, "snapkv", "prefill_vs_full"))
    line("KV kept vs ratio x full", lambda n: _span([r["derived"]["kv_vs_target"] for r in rows if r["length"] == n and r["derived"].get("kv_vs_target") is not None]))
    line("`dynamickv` peak memory vs `full`", lambda n: span(n, "dynamickv", "peak_vs_full"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE.json", help="`kvcli eval -o` or `benchmarks/bench.py --json` results")
    for path in parser.parse_args(argv).files:
        result = json.load(open(path))
        if "checks" in result:
            print(f"### {path}: {result['model']}, copy bandwidth {result['bandwidth_gb_s']:.1f} GB/s\n")
            print(bench_table(result) + "\n")
            continue
        timing = result.get("timing", {})
        print(f"### {path}: model {result['model']}, metric {result['metric']}\n")
        print(table(result) + "\n")
        by_length = niah_by_length(result)
        if by_length:
            print(by_length + "\n")
        if timing:
            print(f"prefill (capture) {timing.get('capture_s')} s, derive {timing.get('derive_s')} s, decode {timing.get('decode_s')} s\n")


if __name__ == "__main__":
    main()
