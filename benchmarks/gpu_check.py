"""kvcli at real sizes on CUDA: random-weight Llama-3-8B, Qwen2.5-7B and Gemma-3-12B at 32K and 128K
tokens, every method, flash-attn against SDPA, and what fits on a GPU.

No weights are downloaded: each model is built from its configuration (the dicts below) directly
on the GPU in bf16. Prompts are random token ids (speed and memory do not depend on what the
tokens say); a prompt's last QUESTION_TOKENS stand for the question, the probe of a chunked read.
For each model and length it measures every method at `--ratio` as `kvcli ask` reads (evidencekv
in chunks past 8,192 tokens, `Method.prefill_chunk`; also once in one pass, as it read before):
prefill time and tokens/s (scoring and selection included), decode tokens/s, the KV bytes kept and
at the prefill's peak (`KVCache.kv_peak_nbytes`), and the CUDA peak (`max_memory_allocated`, reset
before each configuration). evidencekv reads with a seeded random retrieval-head profile (a
random-weight model has no real one); the layers it holds are reported.

flash-attn against SDPA: kvcli's attention of one layer's shape at each length, for prefill, a
4,096-token chunk after the cache and one decoded token, through `kvcli.flash.attend` and
through SDPA (outputs compared, times side by side). Whether kvcli's attention calls flash-attn
(it does once `attention.attend` dispatches through `kvcli.flash`) is counted per configuration
(`flash calls`); when it does, the full cache is also read with flash-attn turned off, so the
two paths compare inside a whole model too.

Attention runs with SDPA's math kernel disabled, so a call that would build a q_len x k_len matrix
fails at once instead of running out of memory after minutes. Configurations not started by
`--time-limit` are skipped (and listed); the models, lengths and methods can be narrowed.

`--smoke` runs the same code on tiny configurations of the three architectures on the CPU in
seconds (tests/test_gpu_check.py, in CI). `--fit` prints, from the configurations alone, what a
GPU must hold (weights + kept cache + one layer's full KV), on any machine. Run it through
scripts/gpu_check.sh, which runs the CUDA tests first. See docs/bench.md and docs/gpu.md.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peak_vs_length, beside this script

# Llama-3-8B's shapes, with the 128K-token context of Llama-3.1 (plain RoPE at theta 500000).
LLAMA3_8B = {
    "model_type": "llama",
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
# Qwen2.5-7B(-Instruct): 128K positions through YaRN (factor 4 over 32,768), as its model card sets.
QWEN25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}
# Gemma-3-12B's text model: five sliding-window layers (1,024 tokens) to one global layer.
GEMMA3_12B = {
    "model_type": "gemma3_text",
    "hidden_size": 3840,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "intermediate_size": 15360,
    "vocab_size": 262208,
    "max_position_embeddings": 131072,
    "sliding_window": 1024,
    "query_pre_attn_scalar": 256,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "rms_norm_eps": 1e-6,
}
MODELS = {"llama-3-8b": LLAMA3_8B, "qwen2.5-7b": QWEN25_7B, "gemma-3-12b": GEMMA3_12B}


def tiny(config: dict, **changes) -> dict:
    """The same architecture, small enough to run every step on a CPU in seconds."""
    small = {**config, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 256, **changes}
    if "head_dim" in config:
        small["head_dim"] = 16
    return small


SMOKE_MODELS = {
    "llama-3-8b": tiny(LLAMA3_8B),
    "qwen2.5-7b": tiny(QWEN25_7B),
    "gemma-3-12b": tiny(GEMMA3_12B, num_hidden_layers=6, sliding_window=256, query_pre_attn_scalar=16),
}
# A label may carry knobs, METHOD:KEY=VALUE[:KEY=VALUE...]: the unequal-head splits (issue 26) decode from packed
# layers (flash-attn or SDPA per KV head on CUDA), each beside its equal-split method at the same bytes.
METHODS = ("full", "streamingllm", "snapkv", "snapkv:head_split=adaptive", "pyramidkv", "dynamickv", "evidencekv",
           "evidencekv:head_split=profile", "evidencekv (one pass)", "h2o")  # h2o last: its all-query scores are the slowest
RATIO = 0.05
NEW_TOKENS = 32
# 32K and 128K tokens; the longest leaves room for the new tokens within the models' positions.
LENGTHS = (32768, 131072 - NEW_TOKENS)
SMOKE_LENGTHS = (512, 1024)
SMOKE_NEW_TOKENS = 8
# H2O scores every prompt query against every key in blocks of kvcli.attention's _SCORE_BLOCK_ELEMENTS:
# at 128K tokens that is a few rows per block, about a million block products per read.
H2O_MAX_LENGTH = 32768
TIME_LIMIT_S = 360  # configurations not started by then are skipped: the whole check stays under ~7 minutes on an H200 (never run: sized by estimate)
ONE_PASS = "evidencekv (one pass)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configurations on the CPU: checks the plumbing in seconds")
    parser.add_argument("--fit", action="store_true", help="print what each model needs on a GPU at each length (no GPU needed) and exit")
    parser.add_argument("--models", default=",".join(MODELS), help=f"models to run (default {','.join(MODELS)})")
    parser.add_argument("--lengths", default=None, help=f"prompt lengths in tokens (default {','.join(map(str, LENGTHS))}; smoke {','.join(map(str, SMOKE_LENGTHS))})")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to measure, in order (default: all, and evidencekv in one pass)")
    parser.add_argument("--ratio", type=float, default=RATIO, help=f"the ratio every compressing method keeps (default {RATIO})")
    parser.add_argument("--new-tokens", type=int, default=None, help=f"tokens decoded per configuration (default {NEW_TOKENS}; smoke {SMOKE_NEW_TOKENS})")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="skip configurations not started after this many seconds")
    parser.add_argument("--h2o-max-length", type=int, default=H2O_MAX_LENGTH, help=f"skip h2o on longer prompts (default {H2O_MAX_LENGTH}: its all-query scores are slow)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON to OUT (rewritten after every configuration)")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(SMOKE_LENGTHS if args.smoke else LENGTHS)
    except ValueError as err:
        parser.error(f"--lengths is a comma-separated list of numbers ({err})")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; use {', '.join(MODELS)}")
    args.new_tokens = args.new_tokens or (SMOKE_NEW_TOKENS if args.smoke else NEW_TOKENS)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode rate is measured after the first token)")
    return args


def method_of(label: str):
    """The method a row's label names: `evidencekv (one pass)`, a name, or NAME:KEY=VALUE[:KEY=VALUE...]."""
    from kvcli.methods import apply_params, make_method, parse_params

    if label == ONE_PASS:
        return make_method("evidencekv")
    name, *knobs = label.split(" ")[0].split(":")
    return apply_params(make_method(name), parse_params(knobs), strict=True)


def make_config(config: dict):
    from transformers import AutoConfig

    values = dict(config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_model(config: dict, device, dtype):
    """A random-weight model of `config`, built where it runs (no CPU detour for 16-24 GB of weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvcli.models import default_attn_implementation

    hf_config = make_config(config)
    # what kvcli would load the model with; prefill and decode switch it to kvcli's attention
    hf_config._attn_implementation = default_attn_implementation(device, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


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


class FlashCalls:
    """Counts the flash-attn kernel calls kvcli makes (zero until `attention.attend` dispatches through `kvcli.flash`)."""

    def __init__(self) -> None:
        import kvcli.flash as flash

        self.count = 0
        self.available = flash.installed() is None
        if not self.available:
            return
        kernels = flash._kernels

        def counted():
            func, kvcache = kernels()

            def count(kernel):
                def call(*args, **kwargs):
                    self.count += 1
                    return kernel(*args, **kwargs)
                return call

            return count(func), count(kvcache)

        flash._kernels = counted


def measure(model, ids, method, budget, profile, new_tokens: int, memory: Memory, calls: FlashCalls, one_pass: bool = False) -> dict:
    """One read of `ids` as `kvcli ask` makes it with `method` (evidencekv chunked past 8,192
    tokens unless `one_pass`), then greedy decoding with EOS ignored: times, KV bytes, peaks."""
    from peak_vs_length import QUESTION_TOKENS, read_setup

    from kvcli.generate import decode, prefill

    compression, chunk = read_setup(model, ids.shape[1], method, budget, profile, QUESTION_TOKENS, one_pass)
    memory.reset()
    memory.sync()
    before = calls.count
    started = time.perf_counter()
    state = prefill(model, ids, compression, chunk_size=chunk, probe_ids=ids[:, -QUESTION_TOKENS:] if chunk else None)
    memory.sync()
    prefill_s = time.perf_counter() - started
    cache = state.cache
    n = ids.shape[1]
    full = cache.full_nbytes(n)
    global_layers = len(cache.compressed_layers) or 1
    row = {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": n / prefill_s,
        "kv_bytes_kept": cache.nbytes(),
        "kv_bytes_full": full,
        "kv_bytes_peak": cache.kv_peak_nbytes,
        # one global layer's full KV: the unit of the memory promise (docs/gpu.md)
        "layer_full_bytes": max(layer.full_length(n) * layer.entry_nbytes() for layer in cache.layers),
        "global_layers": global_layers,
        "chunks": len(state.chunks),
        "min_layer_tokens": min(cache.retained_per_layer()),
        "max_layer_tokens": max(cache.retained_per_layer()),
        # layers whose KV heads hold different numbers of entries (an unequal split: packed, no padding)
        "packed_layers": sum(layer.packed for layer in cache.layers),
        "head_min": min(n_h for layer in cache.head_lengths() for n_h in layer),
        "head_max": max(n_h for layer in cache.head_lengths() for n_h in layer),
    }
    times = [time.perf_counter() for _ in decode(model, state, new_tokens, set())]  # each token is a host int: synced
    row["decode_tokens_per_s"] = (len(times) - 1) / (times[-1] - times[0])
    row["ttft_s"] = times[0] - started
    row["flash_calls"] = calls.count - before
    row["peak_bytes"], row["peak_added_bytes"] = memory.peak()
    del state
    return row


def compare_attention(shape: dict, length: int, device, dtype) -> list[dict]:
    """One layer's attention at `length` keys through flash-attn and through SDPA: prefill, a
    4,096-token chunk after the cache, and one decoded token; max difference and times."""
    import torch

    import kvcli.flash as flash
    from kvcli.attention import LayerAttention, attend

    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // heads
    attn = LayerAttention(scaling=head_dim**-0.5)
    gen = torch.Generator(device=device).manual_seed(0)
    key = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype, generator=gen)
    value = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype, generator=gen)
    rows = []
    for step, q_len in (("prefill", length), ("chunk", min(4096, length)), ("decode", 1)):
        query = torch.randn(1, heads, q_len, head_dim, device=device, dtype=dtype, generator=gen)
        row = {"length": length, "step": step, "q_len": q_len}
        with fused_attention_only(device):
            with flash.use_flash(False):
                sdpa, row["sdpa_s"] = timed(lambda: attend(query, key, value, attn), device)
            row["flash_reason"] = flash.why_not(query, key, value, attn)
            if row["flash_reason"] is None:
                out, row["flash_s"] = timed(lambda: flash.attend(query, key, value, attn), device)
                row["max_abs_diff"] = float((out.float() - sdpa.float()).abs().max())
                row["flash_vs_sdpa_speed"] = row["sdpa_s"] / row["flash_s"]
        rows.append(row)
    return rows


def timed(fn, device, repeats: int = 3):
    """(result, best seconds of `repeats` after one warm-up call)."""
    import torch

    result = fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return result, best


def fit(config: dict, length: int, ratio: float, dtype_bytes: int = 2) -> dict:
    """What a GPU holds for `config` reading `length` tokens at `ratio`, from the configuration
    alone: the weights, the kept cache, one global layer's full KV (the prefill's transient for
    every method but full and dynamickv; evidencekv's promise is PEAK_LAYERS of them)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvcli.methods.evidencekv import PEAK_LAYERS

    hf_config = make_config(config)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_config).parameters())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    entry = 2 * kv_heads * head_dim * dtype_bytes  # keys and values of one token in one layer
    window = config.get("sliding_window")
    types = getattr(hf_config, "layer_types", None) or ["full_attention"] * config["num_hidden_layers"]
    global_layers = sum(kind != "sliding_attention" for kind in types)
    sliding = len(types) - global_layers
    layer = length * entry
    kept = ratio * global_layers * layer + sliding * min(length, window or length) * entry
    return {
        "params": params,
        "weights_bytes": params * dtype_bytes,
        "kv_full_bytes": global_layers * layer + sliding * min(length, window or length) * entry,
        "kv_kept_bytes": int(kept),
        "layer_full_bytes": layer,
        "peak_layers": PEAK_LAYERS,
        "needs_bytes": int(params * dtype_bytes + kept + PEAK_LAYERS * layer),
    }


def render_fit(ratio: float, lengths: list[int]) -> str:
    from kvcli.methods.evidencekv import PEAK_LAYERS

    lines = [f"What a GPU holds at ratio {ratio:g} in bf16: the weights, the kept cache and {PEAK_LAYERS} global layers' full KV "
             "(evidencekv's prefill promise; the prefill's activations come on top)",
             "| model | tokens | weights | full KV | kept KV | one layer's full KV | weights + kept + 2 layers |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, config in MODELS.items():
        for length in lengths:
            f = fit(config, length, ratio)
            lines.append(f"| {name} | {length:,} | {gib(f['weights_bytes'])} | {gib(f['kv_full_bytes'])} | {gib(f['kv_kept_bytes'])} | "
                         f"{gib(f['layer_full_bytes'])} | {gib(f['needs_bytes'])} |")
    return "\n".join(lines)


def gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def run(args: argparse.Namespace, progress) -> dict:
    import torch
    import transformers

    import kvcli.flash as flash
    from kvcli.methods import Budget, make_method
    from peak_vs_length import random_profile

    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    memory = Memory(device)
    calls = FlashCalls()
    configs = SMOKE_MODELS if args.smoke else MODELS
    result = {
        "mode": "smoke" if args.smoke else "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn": flash.installed() or "importable",
        "flash_attn_importable": find_spec("flash_attn") is not None,
        "attention": "kvcli (torch SDPA" + (", math kernel disabled" if device.type == "cuda" else "") + "; flash-attn where kvcli's attention dispatches to it)",
        "dtype": str(dtype).removeprefix("torch."),
        "ratio": args.ratio,
        "new_tokens": args.new_tokens,
        "models": {},
        "rows": [],
        "attention_rows": [],
        "fit": [],
    }
    budget = Budget(ratio=args.ratio)
    for name in args.models:
        config = configs[name]
        if time.perf_counter() - started > args.time_limit:
            result["rows"].append({"model": name, "error": f"skipped: past the {args.time_limit:.0f} s time limit"})
            continue
        built = time.perf_counter()
        model = build_model(config, device, dtype)
        memory.sync()
        hf = model.config
        num_heads = hf.num_attention_heads
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        result["models"][name] = {"config": config, "weight_bytes": weight_bytes, "build_s": time.perf_counter() - built}
        progress(f"built {name} ({hf.num_hidden_layers} layers) on {result['device']} in {time.perf_counter() - built:.1f} s ({gib(weight_bytes)} of weights)")
        gen = torch.Generator().manual_seed(1)
        with torch.inference_mode(), fused_attention_only(device):
            # First calls pay for kernel selection and allocator growth; not timed.
            warm = torch.randint(0, hf.vocab_size, (1, 512), generator=gen).to(device)
            measure(model, warm, make_method("full"), budget, None, 4, memory, calls)
            for length in args.lengths:
                if not args.smoke:
                    result["fit"].append({"model": name, "length": length, **fit(config, length, args.ratio)})
                for row in compare_attention(config, length, device, dtype):
                    result["attention_rows"].append({"model": name, **row})
                ids = torch.randint(0, hf.vocab_size, (1, length), generator=gen).to(device)
                labels = list(args.methods)
                for label in labels + ["full (flash-attn off)"]:
                    if label == "full (flash-attn off)" and not any(r.get("flash_calls") for r in result["rows"] if r.get("model") == name and r.get("length") == length):
                        continue  # kvcli's attention does not call flash-attn: there is nothing to turn off
                    row = {"model": name, "length": length, "method": label, "ratio": None if label.startswith("full") else args.ratio}
                    if time.perf_counter() - started > args.time_limit:
                        row["error"] = f"skipped: past the {args.time_limit:.0f} s time limit"
                    elif label == "h2o" and length > args.h2o_max_length:
                        row["skipped"] = f"h2o past {args.h2o_max_length} tokens (--h2o-max-length): its all-query scores would take most of the time budget"
                    else:
                        method = method_of(label)
                        profile = None
                        if method.needs_profile:
                            plan, _ = budget.plan(length, len(new_layers(model)), method.window_size)
                            profile = random_profile(plan.num_layers if plan else 1, num_heads)
                        try:
                            with flash.use_flash(label != "full (flash-attn off)"):
                                row.update(measure(model, ids, method, budget, profile, args.new_tokens, memory, calls, one_pass=label == ONE_PASS))
                            if profile is not None and method.compresses:
                                row["held_layers"] = method.held_layers(budget.plan(length, len(new_layers(model)), method.window_size)[0], profile)
                        except torch.OutOfMemoryError as err:
                            row["error"] = "out of memory: " + str(err).splitlines()[0]
                        except RuntimeError as err:  # e.g. no fused kernel takes the call
                            row["error"] = str(err).splitlines()[0]
                    result["rows"].append(row)
                    progress(f"{name} {length} tokens {label}: " + (row.get("error") or row.get("skipped") if "error" in row or "skipped" in row else
                             f"prefill {row['prefill_s']:.2f} s, decode {row['decode_tokens_per_s']:.1f} tok/s, KV peak {gib(row['kv_bytes_peak'])}"))
                    write_json(args.json, result)
                del ids
        del model
        memory.reset()
    result["total_s"] = time.perf_counter() - started
    derive(result)
    write_json(args.json, result)
    return result


def new_layers(model) -> list[int]:
    """The layers a method compresses (the global ones), from kvcli's probe of the model."""
    from kvcli.generate import prepare_model

    return prepare_model(model).compressed_layers


def derive(result: dict) -> None:
    """Each row against the full cache of the same model and length, measured in the same run."""
    full = {(row["model"], row["length"]): row for row in result["rows"] if row.get("method") == "full" and "error" not in row}
    for row in result["rows"]:
        base = full.get((row.get("model"), row.get("length")))
        if "error" in row or "skipped" in row or base is None:
            continue
        row["prefill_vs_full"] = row["prefill_s"] / base["prefill_s"]
        row["decode_vs_full"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["peak_vs_full"] = row["peak_bytes"] / base["peak_bytes"] if base.get("peak_bytes") else None
        # the prefill's KV peak above the kept cache, in global layers' full KV: evidencekv promises PEAK_LAYERS at most
        row["kv_excess_layers"] = (row["kv_bytes_peak"] - row["kv_bytes_kept"]) / row["layer_full_bytes"]
    # an unequal-head split's decode against its method's equal split (the same bytes kept): issue 26's "no slower"
    equal = {(row["model"], row["length"], row["method"]): row for row in result["rows"] if "error" not in row and "skipped" not in row}
    for row in result["rows"]:
        base = equal.get((row.get("model"), row.get("length"), str(row.get("method", "")).split(":")[0]))
        if ":" in str(row.get("method", "")) and base is not None and "decode_tokens_per_s" in row:
            row["decode_vs_equal"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    from kvcli.atomic import write_atomic

    write_atomic(path, json.dumps(result, indent=2) + "\n")


def render(result: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def times(n):
        return "-" if n is None else f"{n:.2f}x"

    head = Text(
        f"{result['mode']} | {result['device']} | {result['dtype']} | torch {result['torch']} | transformers {result['transformers']} | "
        f"flash-attn: {result['flash_attn']} | attention: {result['attention']} | ratio {result['ratio']:g} | "
        f"{result['new_tokens']} new tokens | {result.get('total_s', 0):.0f} s in all"
    )
    table = Table(show_edge=False, pad_edge=False)
    for name in ("model", "tokens", "method", "prefill s", "prefill tok/s", "decode tok/s", "KV kept", "KV peak", "peak-kept (layers)",
                 "CUDA peak", "peak - start", "chunks", "flash calls", "prefill/full", "decode/full", "decode/equal"):
        table.add_column(name, justify="left" if name in ("model", "method") else "right")
    for row in result["rows"]:
        if "error" in row or "skipped" in row:
            text = f"[red]{row['error']}[/red]" if "error" in row else row["skipped"]
            table.add_row(row.get("model", ""), str(row.get("length", "")), row.get("method", ""), text, *[""] * 12)
            continue
        table.add_row(
            row["model"], str(row["length"]), row["method"], f"{row['prefill_s']:.2f}", f"{row['prefill_tokens_per_s']:,.0f}",
            f"{row['decode_tokens_per_s']:.1f}", gib(row["kv_bytes_kept"]), gib(row["kv_bytes_peak"]), f"{row.get('kv_excess_layers', 0):.2f}",
            gib(row["peak_bytes"]), gib(row["peak_added_bytes"]), str(row["chunks"]), str(row["flash_calls"]),
            times(row.get("prefill_vs_full")), times(row.get("decode_vs_full")), times(row.get("decode_vs_equal")),
        )
    kernels = Table(show_edge=False, pad_edge=False, title="one layer's attention: flash-attn vs SDPA")
    for name in ("model", "tokens", "step", "SDPA ms", "flash ms", "flash speed-up", "max |diff|", "flash not used because"):
        kernels.add_column(name)
    for row in result["attention_rows"]:
        kernels.add_row(row["model"], str(row["length"]), row["step"], f"{row['sdpa_s'] * 1e3:.2f}",
                        f"{row['flash_s'] * 1e3:.2f}" if "flash_s" in row else "-", times(row.get("flash_vs_sdpa_speed")),
                        f"{row['max_abs_diff']:.2e}" if "max_abs_diff" in row else "-", row["flash_reason"] or "")
    parts = [head, table, kernels]
    if result["fit"]:
        fits = Table(show_edge=False, pad_edge=False, title="what fits (from the configurations)")
        for name in ("model", "tokens", "weights", "kept KV", "one layer's full KV", "weights + kept + 2 layers"):
            fits.add_column(name)
        for f in result["fit"]:
            fits.add_row(f["model"], str(f["length"]), gib(f["weights_bytes"]), gib(f["kv_kept_bytes"]), gib(f["layer_full_bytes"]), gib(f["needs_bytes"]))
        parts.append(fits)
    return Group(*parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if args.fit:
        print(render_fit(args.ratio, args.lengths))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        err.print("gpu_check: no CUDA device here; run with --smoke to check the plumbing on the CPU, or --fit for the memory table")
        return 2
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors; the machine may be shared
    result = run(args, lambda message: err.print(message))
    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = max(out.width, 240)  # 16 columns, unwrapped in a log file
    out.print(render(result))
    return 1 if any("error" in row for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
