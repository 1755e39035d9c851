"""Where a prefill's time goes, as a user's `kvcli ask` spends it: torch.profiler over the command.

    python benchmarks/profile_prefill.py --chars 20400 -- --threads 2 --max-new-tokens 2

Runs `kvcli ask DOC QUESTION --json` (plus the arguments after `--`) in this process, as the
command line does (its allocator settings included), under torch.profiler, and prints the
operators that took the most time (self time) and the prompt's length and prefill seconds from
kvcli's report. DOC is the first `--chars` characters of samples/haystack.txt. Load and decode
are profiled too; keep `--max-new-tokens` small so the prefill dominates. Run alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Explain in detail, with examples, what the document above says about assignment statements."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=20400, help="characters of samples/haystack.txt (default 20400: ~4,500 tokens)")
    parser.add_argument("--top", type=int, default=12, help="operators listed (default 12)")
    parser.add_argument("kvcli_args", nargs="*", help="more `kvcli ask` arguments, after --")
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from kvcli.cli import main as kvcli_main

    with tempfile.TemporaryDirectory() as folder:
        doc = Path(folder) / "doc.txt"
        doc.write_text((ROOT / "samples" / "haystack.txt").read_text(encoding="utf-8")[: args.chars], encoding="utf-8")
        out = io.StringIO()
        sys.argv = ["kvcli", "ask", str(doc), QUESTION, "--json", *args.kvcli_args]
        with profile(activities=[ProfilerActivity.CPU]) as prof, contextlib.redirect_stdout(out):
            try:
                kvcli_main()
            except SystemExit as stop:
                if stop.code:
                    raise
    stats = json.loads(out.getvalue())["stats"]
    print(f"{stats['prompt_tokens']:,} prompt tokens, prefill {stats['prefill_s']:.2f} s ({stats['dtype']}, weights {stats.get('weights') or stats['dtype']})")
    print(f"{'operator':<52}{'calls':>8}{'self s':>9}")
    for event in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]:
        print(f"{event.key[:51]:<52}{event.count:>8}{event.self_cpu_time_total / 1e6:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
