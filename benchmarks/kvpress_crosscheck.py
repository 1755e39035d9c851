"""Cross-check kvcli's snapkv, pyramidkv and streamingllm against NVIDIA kvpress's presses.

kvpress needs a transformers release that kvcli does not allow (kvpress 0.5.x: <5.3, kvcli:
5.20-5.24), so the kvpress half runs in its own virtual environment: this script calls itself
there with `--side kvpress`, then runs kvcli on exactly the token ids kvpress's pipeline built,
and compares, per layer and KV head, the positions each tool kept (Jaccard overlap) and the
greedy answers.

Two ways of treating the question are checked, since the tools default to different ones:
- `prompt`: the whole prompt (context + question) is prefilled under compression, so the
  observation window holds the question. kvcli's `ask` does this; for kvpress the press is
  applied to a `model(...)` call on the whole prompt.
- `context`: only the context is compressed and the question is fed afterwards, uncompressed.
  kvpress's `KVPressTextGenerationPipeline` does this (it is run as is); kvcli does it with
  `prefill` on the context and `extend` with the question (its `--reuse` path).

kvpress records nothing about what it kept, so its kept positions are recovered by matching
each compressed cache row to the full prefill keys of that layer and head (snapshotted by a
forward hook that runs before the press's own hook).

    python benchmarks/kvpress_crosscheck.py --kvpress-python /tmp/kvpress-venv/bin/python --json out.json

See benchmarks/KVPRESS.md for the environment, results and an explanation of every difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache/kvcli/models/smollm2-135m-b179c9523d0e"
DEFAULT_TOPIC = "with"  # pydoc's "with statement" section: ~820 SmolLM2 tokens of real prose
DEFAULT_QUESTION = "Which method of the context manager is called when the suite of a with statement exits?"

# Each kvpress press next to the kvcli method and knobs that should reproduce it. The kvpress
# knobs are its defaults (window 64, kernel 5, beta 20, 4 sinks) except `pyramidkv-w8`: with a
# 64-token window and beta 20 kvpress's PyramidKV falls back to SnapKV below 1,280 kept tokens per layer.
CONFIGS = [
    {"name": "snapkv", "press": "SnapKVPress", "press_kwargs": {"window_size": 64, "kernel_size": 5},
     "method": "snapkv", "knobs": {"window_size": 64, "kernel_size": 5, "pooling": "avg"}},
    {"name": "pyramidkv", "press": "PyramidKVPress", "press_kwargs": {"window_size": 64, "kernel_size": 5, "beta": 20},
     "method": "pyramidkv", "knobs": {"window_size": 64, "kernel_size": 5, "pooling": "avg", "beta": 20}},
    {"name": "pyramidkv-w8", "press": "PyramidKVPress", "press_kwargs": {"window_size": 8, "kernel_size": 5, "beta": 20},
     "method": "pyramidkv", "knobs": {"window_size": 8, "kernel_size": 5, "pooling": "avg", "beta": 20}},
    {"name": "streamingllm", "press": "StreamingLLMPress", "press_kwargs": {"n_sink": 4},
     "method": "streamingllm", "knobs": {"n_sink": 4, "window_size": 8}},
]
MODES = ("prompt", "context")


# --------------------------------------------------------------------------- kvpress side


class KeySnapshots:
    """Forward hooks that keep each layer's full prefill keys, to find what a press kept.

    Registered before a press's context is entered, so they run before the press's own hook
    has pruned the cache.
    """

    def __init__(self, model) -> None:
        self.full: dict[int, object] = {}
        self.handles = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True) for layer in model.model.layers]

    def _hook(self, module, args, kwargs, output) -> None:
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        if kwargs["hidden_states"].shape[1] == layer.keys.shape[2]:  # the prefill: the cache holds only this call
            self.full[module.layer_idx] = layer.keys.clone()

    def kept(self, cache) -> list[list[list[int]]]:
        """Sorted original positions `[layer][kv_head][i]` of the prefill's entries left in `cache`.

        A press gathers rows, so each kept key is a bit-exact copy of one full-prefill key.
        """
        out = []
        for idx in range(len(cache.layers)):
            full = self.full[idx][0].numpy()  # (num_kv_heads, k_len, head_dim)
            kept = cache.layers[idx].keys[0].numpy()  # (num_kv_heads, n_kept (+ decoded tokens), head_dim)
            heads = []
            for head in range(full.shape[0]):
                where = {row.tobytes(): pos for pos, row in enumerate(full[head])}
                # Rows after the prefill's (decoded tokens) match nothing; all of the prefill's match.
                positions = []
                for row in kept[head]:
                    pos = where.get(row.tobytes())
                    if pos is None:
                        break
                    positions.append(pos)
                heads.append(sorted(positions))
            out.append(heads)
        return out


def kvpress_side(spec: dict) -> dict:
    """Run every press in both modes with kvpress; token ids, kept positions and answers."""
    import importlib.metadata as md

    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    inputs = pipe.preprocess(spec["context"], questions=[spec["question"]], answer_prefix="", max_context_length=10**9)
    context_ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
    prompt_ids = torch.cat([context_ids, question_ids], dim=1)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    snapshots = KeySnapshots(model)
    n_new = spec["max_new_tokens"]

    def greedy(cache, logits, position: int) -> list[int]:
        # The loop of KVPressTextGenerationPipeline.generate_answer, minus the question forward.
        tokens = []
        with torch.inference_mode():
            for _ in range(n_new):
                token = int(logits[0, -1].argmax())
                if token in eos:
                    break
                tokens.append(token)
                logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[position]])).logits
                position += 1
        return tokens

    def run(press, mode: str) -> dict:
        cache = DynamicCache()
        started = time.perf_counter()
        if mode == "prompt":
            with torch.inference_mode(), (press(model) if press is not None else contextlib.nullcontext()):
                logits = model(input_ids=prompt_ids, past_key_values=cache, logits_to_keep=1).logits
            kept = snapshots.kept(cache)
            tokens = greedy(cache, logits, prompt_ids.shape[1])
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            how = "press on model(prompt)"
        else:
            try:
                with torch.inference_mode():
                    answer = pipe(spec["context"], question=spec["question"], press=press, max_new_tokens=n_new, cache=cache)["answer"]
                kept = snapshots.kept(cache)  # the pipeline trims question and answer off again
                tokens, how = None, "pipeline"
            except RuntimeError as err:
                # With per-layer lengths (PyramidKV) and SDPA, the pipeline's multi-token question
                # forward gets one mask sized for layer 0 and fails; fed token by token, each
                # step needs no mask, and the result is what a correct mask would give.
                how = f"pipeline failed ({str(err).splitlines()[0]}); same steps with the question fed token by token"
                cache = DynamicCache()
                with torch.inference_mode():
                    with press(model) if press is not None else contextlib.nullcontext():
                        model.model(input_ids=context_ids, past_key_values=cache)
                    kept = snapshots.kept(cache)
                    start = context_ids.shape[1]
                    for i, token in enumerate(question_ids[0].tolist()):
                        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[start + i]])).logits
                tokens = greedy(cache, logits, prompt_ids.shape[1])
                answer = tokenizer.decode(tokens, skip_special_tokens=True)
        return {"kept": kept, "answer": answer, "tokens": tokens, "how": how, "seconds": round(time.perf_counter() - started, 2)}

    runs = [{"config": "full", "ratio": 0.0, "mode": mode, **run(None, mode)} for mode in MODES]
    for ratio in spec["ratios"]:
        for config in spec["configs"]:
            for mode in MODES:
                press = getattr(kvpress, config["press"])(compression_ratio=ratio, **config["press_kwargs"])
                runs.append({"config": config["name"], "ratio": ratio, "mode": mode, **run(press, mode)})
                print(f"kvpress {config['name']} {ratio} {mode}: {runs[-1]['seconds']} s", file=sys.stderr)
    return {
        "versions": {name: md.version(name) for name in ("kvpress", "transformers", "torch")},
        "context_ids": context_ids[0].tolist(),
        "question_ids": question_ids[0].tolist(),
        "runs": runs,
    }


# --------------------------------------------------------------------------- kvcli side


def kvcli_side(spec: dict, kvpress: dict) -> list[dict]:
    """Run kvcli's methods on kvpress's token ids with kvpress's per-layer kept counts."""
    import importlib.metadata as md

    import torch
    from kvcli.generate import decode, extend, prefill
    from kvcli.methods import BudgetPlan, Compression, SnapKV, make_method
    from kvcli.models import load_model
    from kvcli.reading import Reader

    @dataclass
    class KvpressCounts(SnapKV):
        """SnapKV scores with per-layer counts imposed from outside: selection without allocation."""

        counts: tuple = ()

        def layer_budgets(self, plan: BudgetPlan) -> list[int]:
            return list(self.counts)

    torch.set_num_threads(spec["threads"])
    reader = Reader(load_model(spec["model"], device="cpu", dtype="float32"))
    model, tokenizer = reader.model, reader.tokenizer
    context_ids = torch.tensor([kvpress["context_ids"]])
    question_ids = torch.tensor([kvpress["question_ids"]])
    prompt_ids = torch.cat([context_ids, question_ids], dim=1)
    configs = {c["name"]: c for c in spec["configs"]}

    def run(method, counts: list[int] | None, mode: str) -> dict:
        ids = prompt_ids if mode == "prompt" else context_ids
        n = ids.shape[1]
        compression = None  # the full cache
        if counts is not None:
            # None of these methods needs a retrieval-head profile.
            compression = Compression(method, BudgetPlan(num_layers=len(counts), prompt_len=n, total=sum(counts)))
        started = time.perf_counter()
        state = prefill(model, ids, compression)
        kept = [layer.kept_positions().tolist() for layer in state.cache.layers]
        if mode == "context":
            state = extend(model, state, question_ids)
        tokens = list(decode(model, state, spec["max_new_tokens"], reader.eos_ids))
        return {
            "kept": kept, "tokens": tokens, "answer": tokenizer.decode(tokens, skip_special_tokens=True),
            "seconds": round(time.perf_counter() - started, 2),
        }

    rows = []
    for ref in kvpress["runs"]:
        mode = ref["mode"]
        counts = [len(layer[0]) for layer in ref["kept"]]
        if ref["config"] == "full":
            ours = run(make_method("full"), None, mode)
            rows.append(compare(ref, ours, None))
            continue
        config = configs[ref["config"]]
        method = make_method(config["method"], **config["knobs"])
        row = compare(ref, run(method, counts, mode), config)
        if row["counts_kvcli"] != counts and config["method"] in ("snapkv", "pyramidkv"):
            # Same scores, kvpress's own per-layer counts: separates selection from allocation.
            fixed = KvpressCounts(**{k: v for k, v in config["knobs"].items() if k != "beta"}, counts=tuple(counts))
            matched = compare(ref, run(fixed, counts, mode), config)
            row["same_counts"] = {k: matched[k] for k in ("jaccard_mean", "jaccard_min", "heads_identical", "answer_kvcli", "same_answer")}
        rows.append(row)
        print(f"kvcli {ref['config']} {ref['ratio']} {mode}: {row['jaccard_mean']:.4f}", file=sys.stderr)
    for row in rows:
        row["versions_kvcli"] = {name: md.version(name) for name in ("kvcli", "transformers", "torch")}
    return rows


def compare(ref: dict, ours: dict, config: dict | None) -> dict:
    """Per-head Jaccard overlap of kept positions, per-layer counts and answers of one run."""
    scores = []
    for ref_layer, our_layer in zip(ref["kept"], ours["kept"]):
        for a, b in zip(ref_layer, our_layer):
            a, b = set(a), set(b)
            scores.append(len(a & b) / len(a | b) if a | b else 1.0)
    first_diff = None
    if ref["tokens"] is not None:
        pairs = list(zip(ref["tokens"], ours["tokens"]))
        first_diff = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
        if first_diff is None and len(ref["tokens"]) != len(ours["tokens"]):
            first_diff = len(pairs)
    return {
        "config": ref["config"], "ratio": ref["ratio"], "mode": ref["mode"], "kvpress_run": ref["how"],
        "press": config and {"class": config["press"], **config["press_kwargs"]},
        "kvcli_method": config and {"name": config["method"], **config["knobs"]},
        "counts_kvpress": [len(layer[0]) for layer in ref["kept"]],
        "counts_kvcli": [len(layer[0]) for layer in ours["kept"]],
        "jaccard_mean": sum(scores) / len(scores),
        "jaccard_min": min(scores),
        "heads_identical": sum(s == 1.0 for s in scores) / len(scores),
        "answer_kvpress": ref["answer"], "answer_kvcli": ours["answer"],
        "same_answer": ref["answer"].strip() == ours["answer"].strip(),
        "first_token_diff": first_diff,
        "kept_kvpress": ref["kept"], "kept_kvcli": ours["kept"],
    }


def tool_defaults(rows: list[dict], context_len: int) -> list[dict]:
    """kvpress's pipeline (context compressed) against kvcli's `ask` (whole prompt compressed).

    Overlap is measured on context positions only (the pipeline keeps the whole question).
    """
    by_key = {(r["mode"], r["ratio"], r["config"]): r for r in rows}
    out = []
    for (mode, ratio, config), pipeline_row in by_key.items():
        ask_row = by_key.get(("prompt", ratio, config))
        if mode != "context" or config == "full" or ask_row is None:
            continue
        scores = []
        for ref_layer, our_layer in zip(pipeline_row["kept_kvpress"], ask_row["kept_kvcli"]):
            for a, b in zip(ref_layer, our_layer):
                a, b = set(a), {p for p in b if p < context_len}
                scores.append(len(a & b) / len(a | b))
        out.append({
            "ratio": ratio, "config": config, "jaccard_mean": sum(scores) / len(scores),
            "answer_kvpress_pipeline": pipeline_row["answer_kvpress"], "answer_kvcli_ask": ask_row["answer_kvcli"],
            "same_answer": pipeline_row["answer_kvpress"].strip() == ask_row["answer_kvcli"].strip(),
        })
    return out


def table(rows: list[dict]) -> str:
    """A Markdown table of the comparison, one row per mode, ratio and config."""
    lines = [
        "| mode | ratio removed | config | kept/layer kvpress (first..last) | kvcli | mean J | min J | heads identical | same answer | with kvpress counts: mean J / same answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ck, cc = r["counts_kvpress"], r["counts_kvcli"]
        span = lambda c: f"{c[0]}..{c[-1]}" if c[0] != c[-1] else str(c[0])
        extra = ""
        if "same_counts" in r:
            extra = f"{r['same_counts']['jaccard_mean']:.4f} / {'yes' if r['same_counts']['same_answer'] else 'no'}"
        name = r["config"] + (" (†)" if "failed" in r["kvpress_run"] else "")
        lines.append(
            f"| {r['mode']} | {r['ratio']} | {name} | {span(ck)} (sum {sum(ck)}) | {span(cc)} (sum {sum(cc)}) | "
            f"{r['jaccard_mean']:.4f} | {r['jaccard_min']:.4f} | {r['heads_identical']:.1%} | {'yes' if r['same_answer'] else 'no'} | {extra} |"
        )
    if any("failed" in r["kvpress_run"] for r in rows):
        lines.append("\n(†) kvpress's pipeline raised on the question forward; the question was fed token by token instead.")
    return "\n".join(lines)


def build_spec(args) -> dict:
    from pydoc_data.topics import topics

    context = topics[args.topic].strip() + "\n\n"
    return {
        "model": str(Path(args.model).expanduser()), "context": context, "question": args.question,
        "ratios": args.ratios, "configs": [c for c in CONFIGS if c["name"] in args.configs],
        "max_new_tokens": args.max_new_tokens, "threads": args.threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvpress-python", default="/tmp/kvpress-venv/bin/python", help="python of the venv with kvpress installed")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a local Hugging Face checkpoint folder (both sides load it)")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help="pydoc_data.topics key used as the context")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="kvpress compression_ratio: the fraction REMOVED")
    parser.add_argument("--configs", nargs="+", default=[c["name"] for c in CONFIGS], choices=[c["name"] for c in CONFIGS])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every row (kept positions included) here")
    parser.add_argument("--side", choices=["kvpress"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "kvpress":
        args.out.write_text(json.dumps(kvpress_side(json.loads(args.spec.read_text()))))
        return

    spec = build_spec(args)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "kvpress.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([args.kvpress_python, __file__, "--side", "kvpress", "--spec", str(spec_path), "--out", str(out_path)], check=True)
        kvpress = json.loads(out_path.read_text())
    rows = kvcli_side(spec, kvpress)
    print(f"kvpress side: {kvpress['versions']}; kvcli side: {rows[0]['versions_kvcli']}")
    print(f"prompt: {len(kvpress['context_ids'])} context + {len(kvpress['question_ids'])} question tokens; model {spec['model']}")
    print(table(rows))
    defaults = tool_defaults(rows, len(kvpress["context_ids"]))
    print("\nEach tool's default question handling (kvpress pipeline vs kvcli ask), context positions:")
    for d in defaults:
        print(f"  {d['ratio']:<4} {d['config']:13} mean J {d['jaccard_mean']:.4f}  same answer: {'yes' if d['same_answer'] else 'no'}")
    for r in rows:
        print(f"{r['mode']:7} {r['ratio']:<4} {r['config']:13} kvpress: {r['answer_kvpress']!r}\n{'':27}kvcli:   {r['answer_kvcli']!r}")
    if args.json:
        result = {"spec": {k: v for k, v in spec.items() if k != "context"}, "context_chars": len(spec["context"]),
                  "versions_kvpress_side": kvpress["versions"], "context_len": len(kvpress["context_ids"]),
                  "question_len": len(kvpress["question_ids"]), "tool_defaults": defaults, "rows": rows}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
