"""The committed docs match the code they describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_matches_the_help():
    """docs/cli.md is exactly what scripts/gen_cli_docs.py makes from the current --help texts."""
    # A subprocess, because click and typer read the width and colour settings at import.
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--stdout"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert result.stdout == committed, "docs/cli.md is out of date: run python scripts/gen_cli_docs.py and commit it"
