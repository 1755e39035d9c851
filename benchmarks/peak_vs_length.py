"""The KV bytes kvcli's cache holds at its prefill peak, for every method, against the prompt length.

Not a timing: the cache counts the bytes it holds after each layer's attention, before that
layer is compressed (`KVCache.kv_peak_nbytes`), so the table is the same on any machine. Each
read is what `kvcli ask` does for one question (`QueryAware.read`): one pass, or, where the
method asks for it (`Method.prefill_chunk`: evidencekv on long prompts), in chunks with the
question probing each. `evidencekv (one pass)` forces the single pass it made before.

The model is random weights with Qwen2.5-0.5B's KV layout (2 KV heads of 64 dims per layer,
float32) and its first `--layers` layers (8 by default: the CPU reads 32K tokens in minutes, not
hours), one query head per KV head and a small MLP and vocabulary (the KV bytes do not depend on
them; the query heads only cost time). evidencekv reads it with the default model's retrieval-head
profile over those layers, each layer's 14 query heads folded onto its 2 KV heads (the best score
of each group). The peak above the kept cache is also given in layers' full KV, which does not
depend on the layout.

    python benchmarks/peak_vs_length.py --lengths 2048,4096,8192,16384,32768 --json peak.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

QWEN_KV = {  # Qwen2.5-0.5B's KV layout (its depth is 24), 1 query head per KV head
    "hidden_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 128,
    "vocab_size": 1024,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
TINY = {**QWEN_KV, "num_hidden_layers": 8, "hidden_size": 32, "head_dim": 16, "intermediate_size": 32, "vocab_size": 256}
PROFILE = Path(__file__).resolve().parent.parent / "kvcli" / "data" / "profiles" / "qwen2.5-coder-0.5b-3a754fb8531d-v1.json"
LENGTHS = (2048, 4096, 8192, 16384, 32768)
QUESTION_TOKENS = 24  # the question's share of the prompt: its last tokens, the probe of a chunked read
ONE_PASS = "evidencekv (one pass)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths in tokens")
    parser.add_argument("--methods", default=None, help="methods to measure (default: every method, and evidencekv in one pass)")
    parser.add_argument("--ratio", type=float, default=0.1, help="the ratio every method keeps (default 0.1, kvcli's)")
    parser.add_argument("--layers", type=int, default=QWEN_KV["num_hidden_layers"], help="decoder layers (default 8; Qwen2.5-0.5B has 24)")
    parser.add_argument("--tiny", action="store_true", help="8 narrow layers: checks the plumbing in seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the rows as JSON to OUT")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        parser.error("--lengths is a comma-separated list of token counts")
    return args


def folded_profile(num_layers: int, num_heads: int, num_kv_heads: int):
    """The default model's retrieval-head profile for a model with `num_heads` query heads: each
    KV group's best score (the default model has 14 query heads over 2 KV heads per layer); layers
    beyond its 24 repeat its last, fewer layers keep its first."""
    from kvcli.profile import RetrievalProfile

    scores = RetrievalProfile.from_json(PROFILE.read_text()).scores
    per_group = len(scores[0]) // num_kv_heads
    groups = [[max(row[g * per_group:(g + 1) * per_group]) for g in range(num_kv_heads)] for row in scores]
    within = num_heads // num_kv_heads
    rows = [groups[min(layer, len(groups) - 1)] for layer in range(num_layers)]
    return RetrievalProfile(scores=[[row[h // within] for h in range(num_heads)] for row in rows], model="folded qwen2.5-coder-0.5b")


def build_model(config: dict):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=torch.float32).eval()


def random_profile(num_layers: int, num_heads: int, seed: int = 0):
    """A retrieval-head profile of random scores, for random-weight models that have no real one."""
    import torch

    from kvcli.profile import RetrievalProfile

    gen = torch.Generator().manual_seed(seed)
    return RetrievalProfile(scores=torch.rand(num_layers, num_heads, generator=gen).tolist(), model="random")


def read_setup(model, n: int, method, budget, profile, question_len: int, one_pass: bool = False):
    """(compression, chunk size) of a live `kvcli ask` read of `n` tokens with `method`, as
    `QueryAware.read` decides them: the chunk is the method's own (`Method.prefill_chunk`) unless
    `one_pass`; the method's layers are the model's global ones."""
    from kvcli.generate import prepare_model
    from kvcli.methods import Compression

    if not method.compresses:
        return None, None
    plan, _ = budget.plan(n, len(prepare_model(model).compressed_layers), method.window_size)
    if plan is None:
        return None, None
    compression = Compression(method, plan, profile if method.needs_profile else None)
    chunk = None if one_pass else method.prefill_chunk(plan, compression.profile, question_len)
    return compression, chunk


def read_peak(model, ids, method, budget, profile, question_len: int, one_pass: bool = False) -> dict:
    """One live read of `ids` as `kvcli ask` makes it with `method`: the cache's KV peak, what it
    kept, the full cache and one layer of it, in bytes, and the chunks it was read in."""
    from kvcli.generate import prefill

    n = ids.shape[1]
    compression, chunk = read_setup(model, n, method, budget, profile, question_len, one_pass)
    started = time.perf_counter()
    state = prefill(model, ids, compression, chunk_size=chunk, probe_ids=ids[:, n - question_len:] if chunk else None)
    cache = state.cache
    full = cache.full_nbytes(n)
    return {
        "tokens": n,
        "peak_bytes": cache.kv_peak_nbytes,
        "kept_bytes": cache.nbytes(),
        "full_bytes": full,
        "layer_full_bytes": full // model.config.num_hidden_layers,
        "chunks": len(state.chunks),
        "chunk_size": chunk,
        "prefill_s": time.perf_counter() - started,
    }


def measure(args: argparse.Namespace, progress) -> list[dict]:
    import torch

    from kvcli.methods import REGISTRY, Budget, make_method

    torch.set_num_threads(args.threads)
    config = TINY if args.tiny else {**QWEN_KV, "num_hidden_layers": args.layers}
    model = build_model(config)
    profile = folded_profile(config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"])
    names = args.methods.split(",") if args.methods else [*REGISTRY, ONE_PASS]
    gen = torch.Generator().manual_seed(1)
    rows = []
    with torch.inference_mode():
        for length in args.lengths:
            ids = torch.randint(0, config["vocab_size"], (1, length), generator=gen)
            for name in names:
                one_pass = name == ONE_PASS
                method = make_method("evidencekv" if one_pass else name)
                row = {"method": name, **read_peak(model, ids, method, Budget(ratio=args.ratio), profile, QUESTION_TOKENS, one_pass)}
                if method.needs_profile:
                    row["held_layers"] = method.held_layers(Budget(ratio=args.ratio).plan(length, config["num_hidden_layers"], method.window_size)[0], profile)
                row["excess_layers"] = (row["peak_bytes"] - row["kept_bytes"]) / row["layer_full_bytes"]
                rows.append(row)
                progress(f"{length} tokens, {name}: peak {row['peak_bytes'] / 2**20:.1f} MiB, kept {row['kept_bytes'] / 2**20:.1f} MiB "
                         f"(+{row['excess_layers']:.2f} layers' full KV), {row['chunks']} chunk(s), {row['prefill_s']:.1f} s")
    return rows


def render(rows: list[dict]) -> str:
    """Rows are methods, columns prompt lengths; a cell is the KV peak in MiB and, after it, the
    peak above the kept cache in layers' full KV (one layer's full KV is the prompt's KV over one layer)."""
    lengths = sorted({row["tokens"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    cell = {(row["method"], row["tokens"]): row for row in rows}
    lines = [
        "| method | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
        "| --- | " + " | ".join("---" for _ in lengths) + " |",
    ]
    for method in methods:
        cells = []
        for n in lengths:
            row = cell.get((method, n))
            if row is None:
                cells.append("-")
                continue
            chunks = f", {row['chunks']} chunks" if row["chunks"] > 1 else ""
            cells.append(f"{row['peak_bytes'] / 2**20:,.1f} (+{row['excess_layers']:.2f}{chunks})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    full = {row["tokens"]: row for row in rows}
    lines.append("| one layer's full KV | " + " | ".join(f"{full[n]['layer_full_bytes'] / 2**20:,.1f}" for n in lengths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = measure(args, lambda message: print(message, file=sys.stderr, flush=True))
    print(render(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
