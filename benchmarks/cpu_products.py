"""How fast this CPU multiplies a model's weights in each form kvcli could keep them: float32,
bfloat16, int8 per output channel (torch's `_weight_int8pack_mm`), int4 in groups of 32
(`_weight_int4pack_mm_for_cpu`), and int8 weights times int8 inputs two ways: `int8xint8`,
fbgemm's `quantized::linear_dynamic` (each input quantized per call with one scale for all its
rows, the weight prepacked in fbgemm's layout), and `int8xint8 (_int_mm)`, torch's `_int_mm` on
the int8 weight as kvcli stores it (no prepacking; each input row quantized with its own scale,
the int32 result scaled back, all timed), for a decode step (1 row) and a prefill (4,096 rows).
It also times what the fbgemm form costs around its products: packing a weight (once per load)
and unpacking it back to int8 (to widen it for a bfloat16 product), and how fast this machine
reads the decode products' int8 weights without multiplying them (the memory's speed, against
which a decode product's GB/s of weight is measured).

    python benchmarks/cpu_products.py --threads 1 2

Decode products cycle through `--matrices` distinct 896 x 4864 weights (Qwen2.5-0.5B's MLP
shape; 40 of them are 174M parameters, more than any CPU cache), as a decode step reads every
weight of the model once: a product timed on one weight that stays in cache measures the cache,
not the memory a real step waits on. GFLOP/s are 2 x rows x 896 x 4864 per product. Run alone.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

IN_FEATURES, OUT_FEATURES = 896, 4864
GROUP = 32


def timed(calls, repeats: int) -> float:
    """Seconds per call, over `repeats` rounds of every call (after one warm-up round)."""
    for call in calls:
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        for call in calls:
            call()
    return (time.perf_counter() - start) / (repeats * len(calls))


def forms(weights: list[torch.Tensor]) -> dict[str, list]:
    """Each weight in each form, as (kernel, arguments) pairs ready to call with an input."""
    made: dict[str, list] = {"float32": [], "bfloat16": [], "int8": [], "int4": [], "int8xint8": [], "int8xint8 (_int_mm)": []}
    for weight in weights:
        made["float32"].append(lambda x, w=weight: F.linear(x.float(), w))
        made["bfloat16"].append(lambda x, w=weight.bfloat16(): F.linear(x, w))
        scale = weight.abs().amax(dim=1) / 127
        qweight = (weight / scale[:, None]).round().to(torch.int8)
        made["int8"].append(lambda x, q=qweight, s=scale.bfloat16(): torch.ops.aten._weight_int8pack_mm(x, q, s))
        groups = weight.reshape(OUT_FEATURES, IN_FEATURES // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        step = (high - low) / 15
        codes = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.int32).reshape(OUT_FEATURES, IN_FEATURES)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales_zeros = torch.stack([step, low + 8 * step], dim=-1).transpose(0, 1).contiguous().bfloat16()  # (groups, out, 2)
        made["int4"].append(lambda x, p=packed, sz=scales_zeros: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, GROUP, sz))
        fbgemm = fbgemm_pack(qweight, scale)
        made["int8xint8"].append(lambda x, p=fbgemm: torch.ops.quantized.linear_dynamic(x.float(), p, False))
        made["int8xint8 (_int_mm)"].append(lambda x, q=qweight, s=scale.bfloat16(): int_mm(x, q, s))
    return made


def int_mm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`rows` `(n, in)` times the int8 weight `(out, in)` on `torch._int_mm`: each row quantized to
    int8 with its own scale, the int32 products scaled back to bfloat16."""
    wide = rows.float()
    row_scale = wide.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    codes = (wide / row_scale).round_().to(torch.int8)
    return (torch._int_mm(codes, qweight.t()).float() * row_scale * scale).bfloat16()


def read_speed(weights: list[torch.Tensor], repeats: int) -> float:
    """GB/s at which this machine reads the int8 decode weights without multiplying them (a
    max over each, 8 bytes at a time): the memory's speed, which bounds a decode product."""
    codes = [(w * 20).round().clamp(-127, 127).to(torch.int8).view(torch.int64) for w in weights]
    seconds = timed([lambda c=c: c.max() for c in codes], repeats)
    return codes[0].numel() * 8 / seconds / 1e9


def fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor):
    """The weight in fbgemm's prepacked layout (per-channel int8, zero points 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 calls its quantized tensors deprecated
        quantized = torch._make_per_channel_quantized_tensor(qweight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(quantized, None)


HEAD_ROWS = 151_936  # the default model's vocabulary: its output head is this x 896


def fbgemm_costs(weights: list[torch.Tensor], repeats: int) -> str:
    """ms to pack one weight into fbgemm's layout and to unpack it back to an int8 tensor, and
    to pack an output head of the default model's shape."""
    scale = weights[0].abs().amax(dim=1) / 127
    qweight = (weights[0] / scale[:, None]).round().to(torch.int8)
    pack = timed([lambda: fbgemm_pack(qweight, scale)], repeats)
    packed = fbgemm_pack(qweight, scale)
    unpack = timed([lambda: torch.ops.quantized.linear_unpack(packed)[0].int_repr()], repeats)
    head = torch.randint(-127, 128, (HEAD_ROWS, IN_FEATURES), dtype=torch.int8)
    head_pack = timed([lambda: fbgemm_pack(head, torch.full((HEAD_ROWS,), 0.01))], 1)
    return (f"fbgemm form of one {OUT_FEATURES}x{IN_FEATURES} weight: pack {pack * 1e3:.1f} ms, unpack to int8 {unpack * 1e3:.1f} ms; "
            f"of a {HEAD_ROWS}x{IN_FEATURES} output head: pack {head_pack:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--matrices", type=int, default=40, help="distinct weights a decode round reads (default 40)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(OUT_FEATURES, IN_FEATURES) for _ in range(args.matrices)]
    made = forms(weights)
    print(f"torch {torch.__version__}; weights {OUT_FEATURES}x{IN_FEATURES}; GFLOP/s (ms per product)")
    print("| product | threads | " + " | ".join(made) + " |")
    print("| --- | --- |" + " --- |" * len(made))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows, label, count in ((1, "decode, 1 row", args.matrices), (4096, "prefill, 4,096 rows", 2)):
            inputs = torch.randn(rows, IN_FEATURES).bfloat16()
            cells = []
            for calls in made.values():
                seconds = timed([lambda c=c: c(inputs) for c in calls[:count]], args.repeats if rows == 1 else 2)
                cells.append(f"{2 * rows * IN_FEATURES * OUT_FEATURES / seconds / 1e9:.1f} ({seconds * 1e3:.2f})")
            print(f"| {label} | {threads} | " + " | ".join(cells) + " |")
        one_row = torch.randn(1, IN_FEATURES).bfloat16()
        int8_decode = timed([lambda c=c: c(one_row) for c in made["int8"]], args.repeats)
        print(f"{threads} thread(s): reading the {args.matrices} int8 weights {read_speed(weights, args.repeats):.1f} GB/s; "
              f"the int8 decode product reads them at {IN_FEATURES * OUT_FEATURES / int8_decode / 1e9:.1f} GB/s")
    print(fbgemm_costs(weights, args.repeats))


if __name__ == "__main__":
    main()
