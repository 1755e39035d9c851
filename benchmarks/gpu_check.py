"""kvcli at real sizes on CUDA: a random-weight Llama-3-8B, 32K and 128K-token prompts, full vs dynamickv.

No weights are downloaded: the model is built from its configuration directly on the GPU in
bf16. Prompts are random token ids (speed and memory do not depend on what the tokens say).
For each prompt length it measures kvcli's full cache and dynamickv at each ratio: prefill
time (scoring and selection included), decode tokens/s, KV bytes kept, and the CUDA peak
(`max_memory_allocated`, reset before each configuration). Attention runs with the math SDPA
kernel disabled, so a call that would build a q_len x k_len matrix fails at once instead of
running out of memory after minutes.

`--smoke` runs the same code on a tiny configuration on the CPU in seconds (tests/test_gpu_check.py).
Run it through scripts/gpu_check.sh, which runs the CUDA tests first. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from importlib.util import find_spec

# Llama-3-8B's shapes, with the 128K-token context of Llama-3.1 (plain RoPE at theta 500000).
LLAMA3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# The same architecture, small enough to run every step on a CPU in seconds.
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
RATIOS = (0.017, 0.1)
NEW_TOKENS = 32
# 32K and 128K tokens; the longest leaves room for the new tokens within the model's positions.
LENGTHS = (32768, 131072 - NEW_TOKENS)
SMOKE_LENGTHS = (1024, 2048)
SMOKE_NEW_TOKENS = 8
TIME_LIMIT_S = 400  # configurations not started by then are skipped, so the whole check stays under 8 minutes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU: checks the plumbing in seconds")
    parser.add_argument("--lengths", default=None, help=f"prompt lengths in tokens (default {','.join(map(str, LENGTHS))}; smoke {','.join(map(str, SMOKE_LENGTHS))})")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="dynamickv ratios (default 0.017,0.1)")
    parser.add_argument("--new-tokens", type=int, default=None, help=f"tokens decoded per configuration (default {NEW_TOKENS}; smoke {SMOKE_NEW_TOKENS})")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="skip configurations not started after this many seconds")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON to OUT (rewritten after every configuration)")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(SMOKE_LENGTHS if args.smoke else LENGTHS)
        args.ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    except ValueError as err:
        parser.error(f"--lengths and --ratios are comma-separated numbers ({err})")
    args.new_tokens = args.new_tokens or (SMOKE_NEW_TOKENS if args.smoke else NEW_TOKENS)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode rate is measured after the first token)")
    return args


def build_model(smoke: bool):
    """A random-weight Llama built on its device: CUDA bf16, or the CPU in float32 for --smoke."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvcli.models import default_attn_implementation

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    config = LlamaConfig(**(TINY if smoke else LLAMA3_8B))
    # flash-attn when importable, else SDPA: what kvcli would load the model with (prefill and
    # decode switch it to kvcli's attention, which calls torch SDPA's fused kernels itself).
    config._attn_implementation = default_attn_implementation(device, dtype)
    torch.manual_seed(0)
    with torch.device(device):  # weights are created where they live: no 16 GB CPU detour
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), device, dtype


class Memory:
    """Peak allocated bytes per configuration: CUDA's allocator statistics; not measured on the CPU."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.base = 0

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def peak(self) -> tuple[int | None, int | None]:
        """(peak allocated, peak above what was allocated at reset: the weights and little else)."""
        if not self.cuda:
            return None, None
        peak = self.torch.cuda.max_memory_allocated()
        return peak, peak - self.base


def fused_attention_only(device):
    """Disable SDPA's math kernel on CUDA: it is the one that builds the q_len x k_len matrix."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def compression_for(method, budget, prompt_len: int, num_layers: int):
    """What `method` keeps of a `prompt_len`-token prompt under `budget` (None: the full cache).

    The model is built from a config, not loaded, so there is no `Reader` and no retrieval-head
    profile: methods that need one are not measured here.
    """
    from kvcli.methods import Compression

    if method.needs_profile:
        raise ValueError(f"{method.name} needs a retrieval-head profile; a random-weight model has none")
    if not method.compresses:
        return None
    plan, _ = budget.plan(prompt_len, num_layers, method.window_size)
    return Compression(method, plan) if plan is not None else None


def measure(model, ids, compression, new_tokens: int, memory: Memory) -> dict:
    """Prefill (compression included; None keeps the full cache) then greedy decoding, EOS
    ignored; times, KV bytes and the peak."""
    from kvcli.generate import decode, prefill

    memory.reset()
    memory.sync()
    started = time.perf_counter()
    state = prefill(model, ids, compression)
    memory.sync()
    prefill_s = time.perf_counter() - started
    kv_bytes = state.cache.nbytes()
    retained = state.cache.retained_per_layer()
    times = [time.perf_counter() for _ in decode(model, state, new_tokens, set())]  # each token is a host int: synced
    peak, peak_added = memory.peak()
    del state
    return {
        "prefill_s": prefill_s,
        "ttft_s": times[0] - started,
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
        "kv_bytes_kept": kv_bytes,
        "min_layer_tokens": min(retained),
        "max_layer_tokens": max(retained),
        "peak_bytes": peak,
        "peak_added_bytes": peak_added,
    }


def run(args: argparse.Namespace, progress) -> dict:
    import torch
    import transformers

    from kvcli.cache import KVShape
    from kvcli.methods import Budget, make_method

    started = time.perf_counter()
    model, device, dtype = build_model(args.smoke)
    memory = Memory(device)
    memory.sync()
    config = model.config
    num_layers = config.num_hidden_layers
    shape = KVShape.of(config, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "mode": "smoke" if args.smoke else "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn_importable": find_spec("flash_attn") is not None,
        "attention": "kvcli (torch SDPA" + (", math kernel disabled)" if device.type == "cuda" else ")"),
        "model": {key: getattr(config, key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")},
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": weight_bytes,
        "build_s": time.perf_counter() - started,
        "new_tokens": args.new_tokens,
        "rows": [],
    }
    progress(f"built {result['model']['num_hidden_layers']}-layer model on {result['device']} in {result['build_s']:.1f} s ({weight_bytes / 2**30:.1f} GiB of weights)")

    dynamickv, full = make_method("dynamickv"), make_method("full")
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode(), fused_attention_only(device):
        # First calls pay for kernel selection and allocator growth; not timed.
        warm = torch.randint(0, config.vocab_size, (1, 512), generator=gen).to(device)
        measure(model, warm, None, 4, memory)
        measure(model, warm, compression_for(dynamickv, Budget(tokens=64), 512, num_layers), 4, memory)
        for length in args.lengths:
            ids = torch.randint(0, config.vocab_size, (1, length), generator=gen).to(device)
            for method, ratio in [(full, None)] + [(dynamickv, ratio) for ratio in args.ratios]:
                label = method.name if ratio is None else f"{method.name}@{ratio:g}"
                row = {"length": length, "method": method.name, "ratio": ratio, "kv_bytes_full": shape.bytes_for(length)}
                if time.perf_counter() - started > args.time_limit:
                    row["error"] = f"skipped: past the {args.time_limit:.0f} s time limit"
                else:
                    compression = compression_for(method, Budget(ratio=ratio), length, num_layers) if ratio is not None else None
                    try:
                        row.update(measure(model, ids, compression, args.new_tokens, memory))
                    except torch.OutOfMemoryError as err:
                        row["error"] = "out of memory: " + str(err).splitlines()[0]
                    except RuntimeError as err:  # e.g. no fused kernel takes the call
                        row["error"] = str(err).splitlines()[0]
                result["rows"].append(row)
                progress(f"{length} tokens {label}: " + (row["error"] if "error" in row else f"prefill {row['prefill_s']:.2f} s, decode {row['decode_tokens_per_s']:.1f} tok/s"))
                write_json(args.json, result)
    result["total_s"] = time.perf_counter() - started
    derive(result)
    write_json(args.json, result)
    return result


def derive(result: dict) -> None:
    """Each row against the full cache of the same length, measured in the same run."""
    full = {row["length"]: row for row in result["rows"] if row["method"] == "full" and "error" not in row}
    for row in result["rows"]:
        base = full.get(row["length"])
        if "error" in row or base is None:
            continue
        row["prefill_vs_full"] = row["prefill_s"] / base["prefill_s"]
        row["decode_vs_full"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["kv_vs_target"] = row["kv_bytes_kept"] / (row["ratio"] * row["kv_bytes_full"]) if row["ratio"] else None
        row["peak_vs_full"] = row["peak_bytes"] / base["peak_bytes"] if base.get("peak_bytes") else None


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    from kvcli.atomic import write_atomic

    write_atomic(path, json.dumps(result, indent=2) + "\n")


def render(result: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def size(n):
        if n is None:
            return "-"
        return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"

    def times(n):
        return "-" if n is None else f"{n:.2f}x"

    head = Text(
        f"{result['mode']} | {result['device']} | {result['dtype']} | torch {result['torch']} | transformers {result['transformers']} | "
        f"flash-attn importable: {result['flash_attn_importable']} | attention: {result['attention']} | weights {size(result['weight_bytes'])} | "
        f"{result['new_tokens']} new tokens | {result.get('total_s', 0):.0f} s in all"
    )
    table = Table(show_edge=False, pad_edge=False)
    for name in ("tokens", "method", "prefill s", "decode tok/s", "KV kept", "peak", "peak - start", "prefill/full", "decode/full", "KV/target", "peak/full"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for row in result["rows"]:
        label = row["method"] if row["ratio"] is None else f"{row['method']}@{row['ratio']:g}"
        if "error" in row:
            table.add_row(str(row["length"]), label, f"[red]{row['error']}[/red]", *[""] * 8)
            continue
        table.add_row(
            str(row["length"]), label, f"{row['prefill_s']:.2f}", f"{row['decode_tokens_per_s']:.1f}", size(row["kv_bytes_kept"]),
            size(row["peak_bytes"]), size(row["peak_added_bytes"]), times(row.get("prefill_vs_full")), times(row.get("decode_vs_full")),
            times(row.get("kv_vs_target")), times(row.get("peak_vs_full")),
        )
    return Group(head, table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if not args.smoke and not torch.cuda.is_available():
        err.print("gpu_check: no CUDA device here; run with --smoke to check the plumbing on the CPU")
        return 2
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors; the machine may be shared
    result = run(args, lambda message: err.print(message))
    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = max(out.width, 160)
    out.print(render(result))
    return 1 if any("error" in row for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
