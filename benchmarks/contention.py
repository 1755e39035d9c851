"""Decode (and prefill) speed alone and beside busy processes, for torch's default threads and for
kvcli's thread settings, as ratios measured in one run.

One worker process per setting loads the model, reads the prompt once, and then, each time it
is asked, prefills the prompt again and decodes from that cache (EOS ignored), timing both. The
parent starts 0, 1, then 2 busy processes (each a `--busy-threads`-thread torch matrix-product
loop, the kind of neighbour a shared machine has), asks every worker in turn, in a rotated order
each round, and stops the busy processes before the next level. Settings:

- `torch`: torch's default, one thread per core (what kvcli did before `--threads`);
- `one`: `OMP_NUM_THREADS=1`;
- `kvcli`: kvcli's `--threads auto` (`kvcli.threads`): prefill on the free cores counted as each prefill starts,
  decode on at most half the cores, counted again before each decode;
- `kvcli-passive`: the same with `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep at once
  instead of spinning; it has to be set before torch loads, so kvcli does not set it itself).

The numbers only mean something on an otherwise quiet machine: run it alone.

    python benchmarks/contention.py --model smollm2-135m --prompt-tokens 560 --new-tokens 48 --rounds 3 --json contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SETTINGS = ("torch", "one", "kvcli", "kvcli-passive")
BUSY_LEVELS = (0, 1, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="what kvcli --model takes (an embedded name, a folder, a .gguf)")
    parser.add_argument("--prompt-tokens", type=int, default=560, help="prompt length in tokens (random ids)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per measurement")
    parser.add_argument("--busy", default=",".join(map(str, BUSY_LEVELS)), help="numbers of busy processes to measure beside (default 0,1,2)")
    parser.add_argument("--busy-threads", type=int, default=2, help="threads of each busy process (default 2)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"thread settings to compare (default {','.join(SETTINGS)})")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per setting and level; the median is reported")
    parser.add_argument("--settle-s", type=float, default=1.0, help="seconds the busy processes run before measuring")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON to OUT")
    parser.add_argument("--random-model", metavar="DIR", default=None,
                        help="save a random-weight model of SmolLM2-135M's shape (with a word-level tokenizer) in DIR and measure it: no download")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--busy-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.busy = [int(x) for x in args.busy.split(",") if x.strip()]
    except ValueError:
        parser.error("--busy is a comma-separated list of counts")
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {', '.join(unknown)}; use {', '.join(SETTINGS)}")
    if args.new_tokens < 2 or args.rounds < 1 or args.prompt_tokens < 2:
        parser.error("--new-tokens and --prompt-tokens must be at least 2, --rounds at least 1")
    return args


def setting_env(setting: str) -> dict:
    """The environment a worker of `setting` starts with (thread variables are read when torch loads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KVCLI_THREADS")}
    if setting == "one":
        env["OMP_NUM_THREADS"] = "1"
    if setting == "kvcli-passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


# --- the worker: one setting, measured on request ---------------------------------------------


def worker(args: argparse.Namespace) -> int:
    import torch

    import kvcli.threads as threads
    from kvcli.generate import decode, prefill
    from kvcli.models import load_model

    setting = args.worker
    plan = threads.plan_threads("auto") if setting.startswith("kvcli") else None  # None: torch's threads as they are
    if plan is not None:
        torch.set_num_threads(plan.prefill)
    lm = load_model(args.model, device="cpu")
    vocab = lm.model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    prefill(lm.model, ids[:, :16])  # first calls pay for lazy initialisation
    emit({"ready": True, "setting": setting, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        if line.strip() != "go":
            break
        started = time.perf_counter()
        with threads.prefilling(plan):
            state = prefill(lm.model, ids)
        prefill_s = time.perf_counter() - started
        prefill_threads = (plan and plan.last_prefill) or torch.get_num_threads()  # kvcli: counted as it started
        with threads.decoding(plan):  # a no-op for torch and one: no plan
            decode_threads = torch.get_num_threads()
            times = [time.perf_counter() for _ in decode(lm.model, state, args.new_tokens, set())]
        emit({
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": args.prompt_tokens / prefill_s,
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "prefill_threads": prefill_threads,
            "decode_threads": decode_threads,
        })
    return 0


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def busy_worker(threads: int) -> int:
    """A neighbour that keeps `threads` cores busy with matrix products until it is stopped."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(384, 384)
    while True:
        a = torch.tanh(a @ a)


# --- the parent: busy levels x settings ---------------------------------------------------------


class Worker:
    """A worker process of one setting, spoken to over its stdin and stdout."""

    def __init__(self, setting: str, args: argparse.Namespace) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--worker", setting, "--model", args.model,
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        self.setting = setting
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=setting_env(setting))
        self.ready = self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.setting} worker ended early (exit {self.process.wait()})")
        return json.loads(line)

    def measure(self) -> dict:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_busy(count: int, threads: int) -> list[subprocess.Popen]:
    command = [sys.executable, os.path.abspath(__file__), "--busy-worker", "--busy-threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for _ in range(count)]


def stop_busy(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()  # only the processes this run started, by their own handle
    for process in processes:
        process.wait()


def run(args: argparse.Namespace, progress) -> dict:
    import kvcli.threads as threads

    result = {
        "machine": platform.processor() or platform.machine(),
        "cores": threads.usable_cores(),
        "busy_elsewhere_at_start": threads.busy_elsewhere(),
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "busy_threads": args.busy_threads,
        "rounds": args.rounds,
        "samples": [],
    }
    workers = [Worker(setting, args) for setting in args.settings]
    try:
        for level in args.busy:
            busy = start_busy(level, args.busy_threads)
            try:
                time.sleep(args.settle_s if level else 0)
                for round_index in range(args.rounds):
                    order = workers[round_index % len(workers):] + workers[: round_index % len(workers)]
                    for one in order:
                        sample = {"setting": one.setting, "busy": level, "round": round_index, **one.measure()}
                        result["samples"].append(sample)
                        progress(f"busy {level}, {one.setting}: decode {sample['decode_tokens_per_s']:.1f} tok/s on {sample['decode_threads']} thread(s), "
                                 f"prefill {sample['prefill_tokens_per_s']:.0f} tok/s on {sample['prefill_threads']}")
            finally:
                stop_busy(busy)
    finally:
        for one in workers:
            one.close()
    result["table"] = summarize(result["samples"], args.settings, args.busy)
    return result


def summarize(samples: list[dict], settings: list[str], levels: list[int]) -> list[dict]:
    """Per setting and busy level: median speeds, against the same setting alone and against torch's default at that level."""
    def median(setting, level, key):
        values = [s[key] for s in samples if s["setting"] == setting and s["busy"] == level]
        return statistics.median(values) if values else None

    rows = []
    for level in levels:
        for setting in settings:
            decode = median(setting, level, "decode_tokens_per_s")
            prefill = median(setting, level, "prefill_tokens_per_s")
            alone = median(setting, 0, "decode_tokens_per_s")
            base = median("torch", level, "decode_tokens_per_s")
            base_prefill = median("torch", level, "prefill_tokens_per_s")
            rows.append({
                "busy": level, "setting": setting, "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill,
                "decode_threads": median(setting, level, "decode_threads"), "prefill_threads": median(setting, level, "prefill_threads"),
                "decode_vs_alone": decode / alone if decode and alone else None,
                "decode_vs_torch": decode / base if decode and base else None,
                "prefill_vs_torch": prefill / base_prefill if prefill and base_prefill else None,
            })
    return rows


def render(result: dict) -> str:
    def x(value):
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        f"{result['model']}, {result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens, {result['cores']} cores, "
        f"busy processes of {result['busy_threads']} threads, median of {result['rounds']}",
        "| busy | setting | threads (prefill/decode) | decode tok/s | vs alone | vs torch default | prefill tok/s | prefill vs torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["table"]:
        lines.append(
            f"| {row['busy']} | {row['setting']} | {row['prefill_threads']:.0f}/{row['decode_threads']:.0f} | {row['decode_tokens_per_s']:.1f} | "
            f"{x(row['decode_vs_alone'])} | {x(row['decode_vs_torch'])} | {row['prefill_tokens_per_s']:.0f} | {x(row['prefill_vs_torch'])} |"
        )
    return "\n".join(lines)


def save_random_model(folder: str) -> str:
    """A random-weight Llama of SmolLM2-135M's shape and a word-level tokenizer, saved in `folder`
    (decode speed depends on the shapes, not on what the weights or tokens are)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.busy_worker:
        return busy_worker(args.busy_threads)
    if args.worker:
        return worker(args)
    if args.random_model:
        args.model = save_random_model(args.random_model)
    result = run(args, lambda message: print(message, file=sys.stderr, flush=True))
    print(render(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
