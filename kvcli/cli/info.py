"""`kvcli methods` and `kvcli models`: what kvcli can compress with, and what it can run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .output import user_errors

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]

# `kvcli methods` reads the methods from here rather than from their classes, whose modules import
# torch (seconds); scripts/gen_methods_json.py writes it and tests/test_startup.py checks it is current.
METHODS_FILE = Path(__file__).resolve().parent.parent / "data" / "methods.json"


def method_rows(registry: dict, default: str) -> list[dict]:
    """Each method of `registry` as `kvcli methods --json` lists it: name, summary, paper, knobs, default."""
    return [{"name": name, "summary": cls.summary, "paper": cls.paper, "params": cls().params(), "default": name == default}
            for name, cls in registry.items()]


@user_errors
def methods(json_out: JsonFlag = False) -> None:
    """List the compression methods, their knobs (for --param) with defaults, and their papers."""
    rows = json.loads(METHODS_FILE.read_text(encoding="utf-8"))
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    console = Console(highlight=False)
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        default = " (default)" if row["default"] else ""
        console.print(f"[bold]{row['name']}[/bold]{default}: {row['summary']}")
        console.print(f"  knobs: {params}")
        if row["paper"]:
            console.print(f"  paper: {row['paper']}")


@user_errors  # Ctrl-C while it imports torch (seconds): one line, exit 130
def models(json_out: JsonFlag = False) -> None:
    """List the embedded models and the checkpoints converted under KVCLI_HOME, with their sizes."""
    from ..models import kvcli_home, list_models

    entries = list_models()
    if json_out:
        from dataclasses import asdict

        print(json.dumps([asdict(e) for e in entries], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("name", "kind", "installed", "size"):
        table.add_column(column, no_wrap=True)
    table.add_column("path", overflow="fold")
    for entry in entries:
        size = f"{entry.bytes / 2**20:,.0f} MiB" if entry.bytes else "-"
        table.add_row(entry.name, entry.kind, "yes" if entry.installed else "no", size, entry.path or "-")
    console = Console(highlight=False)
    console.print(table)
    console.print(f"converted checkpoints live under {kvcli_home() / 'models'} (set KVCLI_HOME to move them)")
