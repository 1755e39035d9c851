"""What fbgemm's int8-by-int8 products would do to kvcli's decode: speed and error (issue 27).

    python benchmarks/fbgemm_decode.py --length 2000 --steps 48 --threads 2

A measurement, not a product path. kvcli's int8 layers (`kvcli.models.weights.Int8Linear`)
multiply a decode step's rows on torch's `_weight_int8pack_mm` (int8 weights, bfloat16 inputs).
This script swaps, for decode-sized inputs (up to 16 rows) only, some of those layers' products
for fbgemm's `quantized::linear_dynamic`, which also quantizes the input to 8 bits (one scale
per call) and multiplies int8 by int8. Three runs of the same prefill and greedy decode:

- `int8`: kvcli as it is;
- `normed`: fbgemm for the layers whose input is a normalized hidden state and that widen it
  (`in_features` == the model's hidden size < `out_features`: the MLP's gate and up
  projections, the output head);
- `all`: fbgemm for every int8 layer.

A fourth run, `normed, _int_mm`, multiplies the `normed` layers on `torch._int_mm` instead:
the int8 weight as kvcli stores it (nothing prepacked), each input row quantized with its own
scale (benchmarks/cpu_products.py's `int_mm`).

Reported: ms per decode step, whether the greedy tokens equal `int8`'s, and (from a separate
pass) each layer shape's relative error against the int8-weight product on the same inputs
(bias excluded). The layers are packed lazily, outside the timed steps. Run alone.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2000, help="prompt length in tokens (default 2000)")
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed (default 48)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)

    from bench import prose_ids  # the script's own folder is on sys.path when run as a script

    from kvcli.generate import decode, prefill
    from kvcli.methods import Budget, make_method
    from kvcli.models import DEFAULT_MODEL, load_model
    from kvcli.models import weights as W
    from kvcli.reading import Reader

    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    torch.set_num_threads(args.threads)
    reader = Reader(load_model(DEFAULT_MODEL, device="cpu", dtype="int8"))
    hidden = reader.model.config.hidden_size
    original = W.Int8Linear.forward
    from cpu_products import int_mm

    state = {"mode": "int8", "kernel": "fbgemm", "errors": None}

    def packed(layer):
        if not hasattr(layer, "_fbgemm"):
            quantized = torch._make_per_channel_quantized_tensor(
                layer.qweight.data, layer.scale.double(), torch.zeros(layer.out_features, dtype=torch.long), 0)
            layer._fbgemm = torch.ops.quantized.linear_prepack(quantized, None)
        return layer._fbgemm

    def chosen(layer) -> bool:
        return state["mode"] == "all" or (state["mode"] == "normed" and layer.in_features == hidden < layer.out_features)

    def forward(layer, hidden_states):
        rows = hidden_states.reshape(-1, layer.in_features)
        if rows.shape[0] > W.INT8_ROWS or not chosen(layer):
            return original(layer, hidden_states)
        if state["kernel"] == "int_mm":
            out = int_mm(rows, layer.qweight, layer.scale).float()
        else:
            out = torch.ops.quantized.linear_dynamic(rows.float(), packed(layer), False)
        if state["errors"] is not None:
            reference = original(layer, hidden_states).reshape(out.shape).float()
            if layer.bias is not None:
                reference = reference - layer.bias.float()
            state["errors"].setdefault((layer.out_features, layer.in_features), []).append(((out - reference).norm() / reference.norm()).item())
        out = out.to(hidden_states.dtype).reshape(*hidden_states.shape[:-1], layer.out_features)
        return out if layer.bias is None else out + layer.bias

    W.Int8Linear.forward = forward
    ids = prose_ids(reader.tokenizer, args.length)
    compression, _ = reader.compression(make_method("evidencekv"), Budget(ratio=0.22), args.length)

    def run(mode: str, kernel: str = "fbgemm") -> tuple[float, list]:
        state["mode"], state["kernel"] = mode, kernel
        warm = prefill(reader.model, ids[:, :64])
        list(decode(reader.model, warm, 4, set()))  # packs the chosen layers, outside the timing
        read = prefill(reader.model, ids, compression)
        steps = iter(decode(reader.model, read, args.steps + 1, set()))
        tokens = [next(steps)]
        started = time.perf_counter()
        tokens += [next(steps) for _ in range(args.steps)]
        return 1000 * (time.perf_counter() - started) / args.steps, tokens

    base_ms, base_tokens = run("int8")
    print(f"default model, {args.length}-token prompt, evidencekv at 0.22, {args.steps} greedy steps, {args.threads} thread(s)")
    print("| products | ms per step | vs int8 | same tokens as int8 |")
    print("| --- | --- | --- | --- |")
    print(f"| int8 (kvcli) | {base_ms:.1f} | 1.00x | - |")
    for mode, kernel in (("normed", "fbgemm"), ("all", "fbgemm"), ("normed", "int_mm")):
        ms, tokens = run(mode, kernel)
        same = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens)) if a != b), len(tokens))
        label = f"fbgemm, {mode}" if kernel == "fbgemm" else f"{mode}, _int_mm"
        print(f"| {label} | {ms:.1f} | {base_ms / ms:.2f}x | {'all' if tokens == base_tokens else f'the first {same} of {len(tokens)}'} |")
    state["errors"] = {}
    run("all")
    print("\n| layer (out x in) | median relative error | largest |")
    print("| --- | --- | --- |")
    for (out_features, in_features), errors in sorted(state["errors"].items()):
        errors.sort()
        print(f"| {out_features} x {in_features} | {errors[len(errors) // 2]:.4f} | {errors[-1]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
