"""How long kvcli takes to answer before any model runs: `--help`, `ask --help`, `methods` and an
argument error, each a fresh `python -m kvcli` process, for one or more source trees side by side.

Usage: python benchmarks/startup.py [--runs 5] [NAME=TREE ...]   (default: this tree as `now`)
e.g.   git archive d2dae49 | tar -x -C /tmp/before
       python benchmarks/startup.py before=/tmp/before now=.

Each tree is put first on PYTHONPATH; the runs of the trees alternate, so a busy machine slows
them alike. Prints the median wall time of each command per tree, and whether torch was imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "kvcli --help": ["--help"],
    "kvcli ask --help": ["ask", "--help"],
    "kvcli methods": ["methods"],
    "kvcli ask --ratio half doc.txt Q (an argument error)": ["ask", "--ratio", "half", "doc.txt", "Q"],
}
# Runs kvcli as `python -m kvcli` does, then says whether the process imported torch.
PROBE = "import runpy, sys\ntry:\n    runpy.run_module('kvcli', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)"


def once(tree: Path, args: list[str]) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=tree)
    seconds = time.perf_counter() - began
    return seconds, proc.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", default=["now=."], metavar="NAME=TREE")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trees = {name: Path(path).resolve() for name, _, path in (tree.partition("=") for tree in args.trees)}
    times: dict[tuple[str, str], list[float]] = {}
    torch_seen: dict[tuple[str, str], bool] = {}
    for _ in range(args.runs):
        for label, command in COMMANDS.items():
            for name, tree in trees.items():
                seconds, imported = once(tree, ["kvcli", *command])
                times.setdefault((label, name), []).append(seconds)
                torch_seen[label, name] = imported
    names = list(trees)
    print(f"median of {args.runs} runs, seconds (torch imported?); python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print("| command | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---:" for _ in names) + " |")
    for label in COMMANDS:
        cells = [f"{statistics.median(times[label, name]):.2f} ({'torch' if torch_seen[label, name] else 'no torch'})" for name in names]
        print(f"| `{label}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
