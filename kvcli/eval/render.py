"""Rich tables for people: the mean score per method x budget, then a length x depth grid per NIAH setting.

Nothing here prints: the caller (the CLI) prints what `render` returns.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .results import EvalResult
from .settings import Setting


def _cell(value: float | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    style = "green" if value >= 0.8 else "yellow" if value >= 0.4 else "red"
    return Text(f"{value:.2f}", style=style)


def render(result: EvalResult) -> Group:
    """Mean score per method x budget (with % of full), then NIAH grids if any."""
    n = max((e["n"] for e in result.summary), default=0)
    read = "" if result.modes == ["query"] else f", read {' / '.join(result.modes)}"
    parts: list = [Text(f"{result.metric} on {n} samples, model {result.model}{read}", style="bold"), render_summary(result)]
    for title, table in render_niah(result):
        parts += [Text(""), Text(title, style="bold"), table]
    return Group(*parts)


def render_summary(result: EvalResult) -> Table:
    """A row per method (and mode), a column per budget or ratio: the mean score and its % of full."""
    entries = result.summary
    levels = list(dict.fromkeys(Setting.of(e).label for e in entries if e["method"] != "full"))
    by_ratio = any(e["ratio"] is not None for e in entries)
    table = Table()
    table.add_column("method")
    for level in levels:
        table.add_column(f"ratio {level}" if by_ratio else f"budget {level}", justify="right")
    if not levels:
        table.add_column("score", justify="right")
    rows: dict[str, dict[str, dict]] = {}
    for entry in entries:
        rows.setdefault(Setting.of(entry).row_label, {})[Setting.of(entry).label] = entry
    for name, cells in rows.items():
        if "full" in cells:
            entry = cells["full"]
            # full does not depend on the budget: the same reference under every column
            table.add_row(Text(name, style="bold"), *[_cell(entry["score"]) for _ in (levels or [None])])
            continue
        row = [Text(name, style="bold")]
        for level in levels:
            entry = cells.get(level)
            text = _cell(entry["score"] if entry else None)
            if entry and entry["pct_of_full"] is not None:
                text.append(f" ({entry['pct_of_full']:.0f}%)", style="dim")
            row.append(text)
        table.add_row(*row)
    return table


def render_niah(result: EvalResult) -> list[tuple[str, Table]]:
    """A (title, length x depth grid) per method at each budget."""
    tables = []
    for grid in result.niah or []:
        setting = Setting.of(grid)
        title = setting.row_label if setting.label == "full" else f"{setting.row_label} at {'ratio' if grid['ratio'] is not None else 'budget'} {setting.label}"
        table = Table()
        table.add_column("length \\ depth", justify="right")
        for depth in grid["depths"]:
            table.add_column(f"{depth:g}", justify="right")
        for length, scores in zip(grid["lengths"], grid["scores"]):
            table.add_row(str(length), *[_cell(s) for s in scores])
        tables.append((f"needle found: {title}", table))
    return tables
