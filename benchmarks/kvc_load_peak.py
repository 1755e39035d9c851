"""The memory `store.load_cache` takes to load a `.kvc` file, against the file's size.

Not a timing: the peak resident set (VmHWM in /proc/self/status, Linux) is read in a fresh
process once torch and kvcli are imported, then again after the load; the difference is what
loading cost at its peak, the loaded cache included. The model is not loaded: the file is
checked against its own config hash, so only the store's work is counted. Make the file first,
for example the full cache of the sample with the default model (about 120 MB in float32):

    kvcli read samples/python_exceptions.txt -o doc.kvc
    python benchmarks/kvc_load_peak.py doc.kvc

`--dtype float32` loads as a float32 model would (a `--save-dtype bfloat16` file is widened).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/self/status (this measurement needs Linux)")


def header(path: Path) -> dict:
    """The kvcli metadata of a .kvc file, read from its safetensors header."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(json.loads(handle.read(size))["__metadata__"]["kvcli"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the .kvc file to load")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="the model's dtype (default: keep the file's)")
    args = parser.parse_args()

    import torch  # imported before the first reading, so its memory is not counted

    from kvcli.store import load_cache

    meta = header(args.path)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux 4.0+)
    except OSError:
        pass  # then the imports' own peak may hide a smaller load's: the last field says by how much
    before_rss, before_hwm = status_kib("VmRSS"), status_kib("VmHWM")
    saved = load_cache(args.path, meta["config_hash"], meta["model"], dtype=getattr(torch, args.dtype) if args.dtype else None)
    after_hwm = status_kib("VmHWM")
    file_mib = os.path.getsize(args.path) / 2**20
    peak_mib = (after_hwm - before_rss) / 1024
    print(json.dumps({
        "file_mib": round(file_mib, 1),
        "cache_mib": round(saved.cache.nbytes() / 2**20, 1),
        "load_peak_mib": round(peak_mib, 1),
        "peak_x_file": round(peak_mib / file_mib, 2),
        "hwm_before_exceeded_rss_by_mib": round((before_hwm - before_rss) / 1024, 1),
    }))


if __name__ == "__main__":
    sys.exit(main())
