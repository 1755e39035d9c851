"""Markdown tables for docs/results.md from `kvcli eval --json` files.

    python benchmarks/results_tables.py results/niah-qwen2.5-coder-0.5b.json [...]
"""

from __future__ import annotations

import json
import sys
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


def main() -> None:
    for path in sys.argv[1:]:
        result = json.load(open(path))
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
