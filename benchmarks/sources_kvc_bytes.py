"""What the map back to the documents (`--sources` from a saved cache) adds to a `.kvc` file.

    python benchmarks/sources_kvc_bytes.py [-m smollm2-135m] [FILES...]

Saves the same documents with `kvcli read` (a full prefix) and `kvcli compress` (the default
ratio), each with and without the map (each prompt position's character offset as int32, the
documents' text as UTF-8 and the sources' spans in the metadata), and prints the sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2-135m")
    parser.add_argument("files", nargs="*", default=[str(ROOT / "samples" / "python_exceptions.txt")])
    args = parser.parse_args()
    from typer.testing import CliRunner

    from kvcli.cli import app

    runner = CliRunner()
    workdir = Path(tempfile.mkdtemp(prefix="kvcli-kvc-bytes-"))
    text_bytes = sum(len(Path(f).read_bytes()) for f in args.files)
    print(f"documents: {', '.join(args.files)} ({text_bytes:,} bytes); model {args.model}")
    print("| file | with the map | without | added | added per prompt token |")
    print("|---|---|---|---|---|")
    for command in ("read", "compress"):
        sizes, tokens = {}, 0
        for with_map in (True, False):
            out = workdir / f"{command}-{with_map}.kvc"
            with contextlib.ExitStack() as stack:
                if not with_map:  # as a kvcli from before --sources saved it
                    for name in ("kvcli.cli.read", "kvcli.cli.compress"):
                        stack.enter_context(mock.patch.object(sys.modules[name], "source_map_tensors", lambda *a: ({}, None)))
                result = runner.invoke(app, [command, *args.files, "-o", str(out), "-m", args.model, "--json"])
            if result.exit_code != 0:
                raise SystemExit(result.stderr)
            sizes[with_map] = out.stat().st_size
            if with_map:
                from kvcli.store import _read_header

                with open(out, "rb") as handle:
                    meta, _, _ = _read_header(handle, out)
                tokens = int(meta["prompt_tokens"])
        added = sizes[True] - sizes[False]
        print(f"| `kvcli {command}` | {sizes[True]:,} | {sizes[False]:,} | {added:,} bytes ({100 * added / sizes[False]:.2f}%) | {added / tokens:.1f} |")


if __name__ == "__main__":
    main()
