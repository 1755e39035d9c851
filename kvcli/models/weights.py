"""Weights as a CPU likes them: int8 per output channel, stored once, multiplied in bfloat16.

A decode step reads every weight of the model to compute one token, so its speed is the speed of
matrix-vector products over the weights' bytes; a prefill is large matrix products, bound by
arithmetic. On a CPU with bfloat16 instructions (AVX-512 BF16, AMX) neither is best in float32:
measured on this project's 2-core AMD EPYC at 2 threads (benchmarks/cpu_products.py, weights
streamed as a decode step reads them), a 1 x 896 by 896 x 4864 product ran at 5.8 GFLOP/s in
float32, 13.8 in bfloat16 and 24.2 from int8 weights with bfloat16 inputs (torch's
`_weight_int8pack_mm`); a 4,096-row product at 124 GFLOP/s in float32, 336 in bfloat16 and 128
on the int8 kernel.

So each linear layer keeps its weight once, as int8 with one bfloat16 scale per output channel
(half of bfloat16's bytes, a quarter of float32's), and picks its product by the rows it is given:
up to `INT8_ROWS` rows (a decode step, a short question) go through an int8 kernel (kvcli's own,
kvcli/models/int8_kernel.py, where it builds and runs, with the weight reordered into its blocked
layout at load; else torch's); more rows (a prefill) widen the weight to bfloat16 for that one
product (a few milliseconds against the product's hundreds; an MLP reading a prefill in blocks
widens its weights once for all of them) and multiply in bfloat16. A plain embedding table is
int8 per row too (tied to the output head, it is the head's table); the other tensors (norms,
biases, an embedding class that computes more than a lookup) stay in the model's dtype.

Rounding to 8 bits per channel moves each weight by at most half a step (the channel's largest
magnitude / 254); GGUF weights were 4-6 bits already. tests/test_weights.py checks the products
against float32 and the embedded model's answers against its float32 answers.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from . import int8_kernel
from .cpu import cpu_flags

# Products with at most this many rows use the int8 kernel (decode); more rows widen the weight
# to bfloat16 for the product (prefill). At 4,096 rows the int8 kernel ran at 0.4x bfloat16's
# speed (benchmarks/cpu_products.py); where between 1 and 4,096 they cross was not measured.
INT8_ROWS = 16

# torch's int8 kernel (2.13, CPU) reads its rows in blocks of 16: other widths gave wrong numbers at
# one row and crashed (segfault) at 2-16 (found in review, issue 27). Those layers widen the
# weight to bfloat16 for every product instead; common checkpoints' widths are multiples of 16.
KERNEL_IN_FEATURES = 16

# The dtype products are computed in: the int8 kernel's inputs, and the widened weights.
PRODUCT_DTYPE = torch.bfloat16


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware (AVX-512 BF16 or AMX), where the
    int8-weight products above pay; elsewhere bfloat16 is emulated and float32 stays faster.
    KVCLI_CPU_BF16=0 or 1 overrides what /proc/cpuinfo says (a virtual machine may list the flag
    for a CPU it emulates slowly; the test suite pins 0 so its numbers are every machine's)."""
    override = os.environ.get("KVCLI_CPU_BF16", "").strip()
    if override in ("0", "1"):
        return override == "1"
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel): `(int8 weight (out, in), scale (out,))` with
    weight ~= int8 * scale; an all-zero row gets scale 1 (its int8 values are 0 anyway)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(PRODUCT_DTYPE).float()  # the scale the products will use, so rounding sees it
    qweight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return qweight, scale.to(PRODUCT_DTYPE)


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight and a bfloat16 scale per output channel; returns its
    input's dtype. `qweight` `(out_features, in_features)` int8, `scale` `(out_features,)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.empty((out_features, in_features), dtype=torch.int8, device=device), requires_grad=False)
        self.scale = nn.Parameter(torch.empty((out_features,), dtype=PRODUCT_DTYPE, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty((out_features,), dtype=dtype, device=device), requires_grad=False) if bias else None
        self.widened: torch.Tensor | None = None  # `dequantized()`, held while an MLP reads a prefill in blocks (`widened_once`)
        self.blocked = False  # `qweight`'s bytes in kvcli's kernel's blocked layout (`block_for_decode`), not row-major

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 form of `linear` (its weight rounded per output channel; its bias kept)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, device="meta")
        qweight, scale = quantize_rows(linear.weight)
        module.qweight = nn.Parameter(qweight, requires_grad=False)
        module.scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def row_major(self) -> torch.Tensor:
        """The int8 weight `(out_features, in_features)` row-major (a copy when it is blocked)."""
        return int8_kernel.from_blocked(self.qweight) if self.blocked else self.qweight

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the int8 weight, `(*ids.shape, in_features)` (a tied embedding's lookup)."""
        return int8_kernel.blocked_rows(self.qweight, ids) if self.blocked else self.qweight[ids]

    def block_for_decode(self) -> bool:
        """Reorder the weight in place into the blocked layout that kvcli's kernel reads fastest,
        where that kernel runs and takes this shape; returns whether it is blocked."""
        if not self.blocked and int8_kernel.can_block(self.qweight):
            int8_kernel.to_blocked(self.qweight.data)
            self.blocked = True
        return self.blocked

    def dequantized(self) -> torch.Tensor:
        """The weight as the products see it, `(out_features, in_features)` bfloat16."""
        return self.row_major().to(PRODUCT_DTYPE) * self.scale[:, None]

    def widened_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the weight as the products see it, `(stop - start, in_features)` bfloat16:
        a slice of `dequantized()` without widening the rest."""
        ids = torch.arange(start, stop, device=self.qweight.device)
        return self.rows(ids).to(PRODUCT_DTYPE) * self.scale[start:stop, None]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.reshape(-1, self.in_features).to(PRODUCT_DTYPE).contiguous()  # (tokens, in_features)
        if rows.shape[0] <= INT8_ROWS and (out := int8_kernel.rows_product(rows, self.qweight, self.scale, self.blocked)) is not None:
            pass  # kvcli's kernel (any width), where it runs: 1.9-2.7x torch's on the large weights at batch one
        elif rows.shape[0] <= INT8_ROWS and self.in_features % KERNEL_IN_FEATURES == 0:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.row_major(), self.scale)
        else:
            out = F.linear(rows, self.widened if self.widened is not None else self.dequantized())
        out = out.to(hidden_states.dtype).reshape(*hidden_states.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """A plain `nn.Embedding` whose table is int8 with a bfloat16 scale per row (per token):
    each looked-up row is widened to `dtype`. Tied to the output head, the table is the head's
    (`tied_to`), not a copy; else it is its own `qweight` `(num_embeddings, embedding_dim)` and `scale`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, padding_idx: int | None = None,
                 tied_to: Int8Linear | None = None, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype, self.padding_idx = dtype, padding_idx
        self.tied_to = [tied_to] if tied_to is not None else []  # a list: the head is the output layer's module, not a child of this one
        if tied_to is None:
            self.qweight = nn.Parameter(torch.empty((num_embeddings, embedding_dim), dtype=torch.int8, device=device), requires_grad=False)
            self.scale = nn.Parameter(torch.empty((num_embeddings,), dtype=PRODUCT_DTYPE, device=device), requires_grad=False)

    @classmethod
    def of(cls, embedding: nn.Embedding, tied_to: Int8Linear | None = None) -> Int8Embedding:
        """The int8 form of `embedding`; `tied_to`: the output head (already int8) it shares its table with."""
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.dtype, embedding.padding_idx, tied_to, device="meta")
        if tied_to is None:
            qweight, scale = quantize_rows(embedding.weight)
            module.qweight = nn.Parameter(qweight, requires_grad=False)
            module.scale = nn.Parameter(scale, requires_grad=False)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The int8 table (the head's when tied, maybe in its blocked layout), for code that asks
        the embedding for its device or its shape."""
        return (self.tied_to[0] if self.tied_to else self).qweight

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of its own int8 table (an untied embedding's table is never blocked)."""
        return self.qweight[ids]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        owner = self.tied_to[0] if self.tied_to else self  # the head (`Int8Linear.rows`: blocked or not) or itself
        return (owner.rows(input_ids).to(PRODUCT_DTYPE) * owner.scale[input_ids][..., None]).to(self.dtype)


def block_for_decode(model: nn.Module) -> int:
    """Reorder every int8 weight kvcli's kernel can read blocked (`Int8Linear.block_for_decode`),
    after the model is loaded and never before `save_quantized`; returns how many."""
    return sum(module.block_for_decode() for module in model.modules() if isinstance(module, Int8Linear))


def _replace_linears(model: nn.Module, make) -> int:
    """Replace every plain `nn.Linear` of `model` by `make(linear)`, one at a time; returns how many.
    A subclass (a quantized or custom layer) computes something else: left alone."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def quantize_model(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` by its `Int8Linear`, one at a time (the float weight
    is freed as its int8 form is made), and a plain `nn.Embedding` by an `Int8Embedding` (tied to
    the output head: the head's int8 table). Returns how many linear layers were replaced."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = (
        type(embedding) is nn.Embedding and type(head) is nn.Linear
        and embedding.weight.data_ptr() == head.weight.data_ptr() and head.bias is None
    )
    replaced = _replace_linears(model, Int8Linear.of)
    if type(embedding) is nn.Embedding:  # a subclass (Gemma's scaled embedding) computes more than a lookup: left as it is
        model.set_input_embeddings(Int8Embedding.of(embedding, model.get_output_embeddings() if tied else None))
    return replaced


# A prefill feeds a dense MLP at most this many tokens at once: its intermediate activations
# (tokens x intermediate size, 45 MB per 4,600 tokens of Qwen2.5-0.5B in bfloat16, four at a time)
# were the largest part of a prefill's memory; 1,024 rows keep the products as fast.
MLP_ROWS = 1024


def mlp_in_blocks(model: nn.Module, rows: int = MLP_ROWS) -> int:
    """Make every dense MLP of `model` (a module named `mlp` whose class name ends in MLP, which
    computes each token alone) take its tokens `rows` at a time; the same numbers, less memory.
    Mixture-of-experts blocks are left alone. Returns how many MLPs were changed."""
    changed = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp" and type(module).__name__.endswith("MLP"):
            module.forward = _blocked(module, module.forward, rows)  # an instance attribute: the state dict keeps its names
            changed += 1
    return changed


def _blocked(module: nn.Module, forward, rows: int):
    whole = []  # set once the module turns out to return more than a tensor (gpt-oss's MLP is a mixture of experts)

    def blocked(hidden_states: torch.Tensor, *args, **kwargs):
        if hidden_states.shape[-2] <= rows or args or kwargs or whole:
            return forward(hidden_states, *args, **kwargs)
        parts = hidden_states.split(rows, dim=-2)
        with widened_once(module):
            first = forward(parts[0])
            if not isinstance(first, torch.Tensor):
                whole.append(True)
                return forward(hidden_states)
            return torch.cat([first, *(forward(part) for part in parts[1:])], dim=-2)

    return blocked


@contextlib.contextmanager
def widened_once(module: nn.Module):
    """Within the block, `module`'s int8 layers multiply by their weight widened once, not once
    per block of rows (the widened weights, ~26 MB for a Qwen2.5-0.5B MLP, are freed after)."""
    layers = [layer for layer in module.modules() if isinstance(layer, Int8Linear) and layer.widened is None]
    try:
        for layer in layers:
            layer.widened = layer.dequantized()
        yield
    finally:
        for layer in layers:
            layer.widened = None


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's float tensors to `dtype`, except the int8 layers' scales, which the
    int8 kernel takes in bfloat16 (`Module.to(dtype)` would cast those too)."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype and not (isinstance(module, Int8Linear) and name == "scale"):
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype and name != "inv_freq":
                module._buffers[name] = buffer.to(dtype)
    for module in model.modules():
        if isinstance(module, Int8Embedding):
            module.dtype = dtype


def int8_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: int8 tables, their scales and the other tensors."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


# The file of a checkpoint saved with int8 weights, beside its config.json and tokenizer.
QUANTIZED_FILE = "model-int8.safetensors"


def save_quantized(model: nn.Module, folder: Path, fingerprint: str) -> None:
    """Write `model` (after `quantize_model`) as `folder/QUANTIZED_FILE` plus its config and
    generation config, for `load_quantized`; the tokenizer is the caller's to save. `fingerprint`
    is `identity.weights_fingerprint` of the float weights it was made from (`saved_fingerprint`)."""
    from safetensors.torch import save_file

    if any(getattr(module, "blocked", False) for module in model.modules()):
        raise ValueError("save_quantized needs row-major int8 weights: save before block_for_decode")
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it (part of the config's hash)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(folder / QUANTIZED_FILE),
              metadata={"weights_fingerprint": fingerprint})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def is_quantized(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint `save_quantized` wrote."""
    return (folder / QUANTIZED_FILE).is_file()


def saved_fingerprint(folder: Path) -> str:
    """The float weights' fingerprint `save_quantized` kept: a .kvc file read with the float
    model matches the int8 one (their numbers differ as a bfloat16 load's do)."""
    from safetensors import safe_open

    with safe_open(str(folder / QUANTIZED_FILE), framework="pt") as saved:
        return (saved.metadata() or {}).get("weights_fingerprint", "")


def load_quantized(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model `save_quantized` wrote, its other tensors in `dtype`, without ever holding
    float weights: the module tree is built with its parameters on the meta device (buffers such
    as RoPE's frequencies are computed as usual), its linear layers swapped for empty int8 ones,
    then every tensor is taken from the file as it is."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _replace_linears(model, lambda linear: Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device="meta"))
    state = _read_tensors(folder / QUANTIZED_FILE)
    embedding = model.get_input_embeddings()
    prefix = next(name for name, module in model.named_modules() if module is embedding)
    if type(embedding) is nn.Embedding and prefix + ".weight" not in state:  # made int8 by quantize_model
        tied = None if prefix + ".qweight" in state else model.get_output_embeddings()
        model.set_input_embeddings(Int8Embedding(embedding.num_embeddings, embedding.embedding_dim, dtype, embedding.padding_idx, tied, device="meta"))
    state = {name: tensor if tensor.dtype in (torch.int8, PRODUCT_DTYPE) and _is_int8_part(name) else tensor.to(dtype)
             for name, tensor in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


_FILE_DTYPES = {"I8": torch.int8, "BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each read into memory torch allocated. Not mapped:
    a mapped file's tensors start wherever the file puts them, and torch's int8 kernel reads
    its weight with aligned vector loads (a mapped int8 weight crashed it, issue 27); reading with
    plain reads also keeps the file's pages out of the process's resident memory."""
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
        start = 8 + header_len
        tensors = {}
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0] if item[0] != "__metadata__" else -1):
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_FILE_DTYPES[entry["dtype"]])
            handle.seek(start + begin)
            if end > begin and handle.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ModelError(f"{path} ends inside tensor {name}: delete {path.parent} and kvcli converts the model again")
            tensors[name] = tensor
    return tensors


def _is_int8_part(name: str) -> bool:
    """Whether a saved tensor is an int8 layer's table or scale (kept as saved) rather than a
    float tensor of the model (cast to its dtype)."""
    return name.endswith((".qweight", ".scale"))  # Int8Linear's and Int8Embedding's
