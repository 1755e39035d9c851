"""Each layer's rotary position embedding (RoPE), and moving post-RoPE keys to new positions.

kvcli stores keys after RoPE. To read past a model's positions it re-indexes kept keys to new,
packed positions; moving a key from position p to p' is one rotation by the angle between them,
with the layer's own frequencies. `rotary_layout(config)` says, from the config alone (so a run
can be refused before the weights load), how each layer rotates; `rerotate` moves keys.

The frequencies come from transformers' own init functions (`ROPE_INIT_FUNCTIONS`, or the
model's rotary class for plain RoPE), so they are the model's, scaling included. What
transformers does not say as data, which pairs of dimensions rotate and which layers have no
RoPE, comes from reading each architecture's modeling file: `_ARCHITECTURES` lists the ones
whose keys `tests/test_rope.py` checks against the model itself. Anything else is refused.

The model computes `cos, sin = cos(p * w) * s, sin(p * w) * s`, where `s` is
`attention_scaling` (YaRN, LongRoPE). A stored key is therefore `s * R(p) k`, and
`R(p' - p) (s * R(p) k) = s * R(p') k`: a shift rotates by the difference and must not apply
`s` again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import KvcliError

HALF = "half"  # pairs (i, i + rotary_dim/2): Llama's `rotate_half`
INTERLEAVED = "interleaved"  # pairs (2i, 2i + 1): GPT-J's `rotate_every_two`, Cohere, GLM, Llama 4's complex product

# Rope types whose frequencies are fixed for the positions kvcli uses. "dynamic" (dynamic NTK)
# recomputes them from the longest position in each forward pass, so a shift does not compose.
_FIXED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class UnsupportedRope(KvcliError):
    """The model's RoPE cannot be moved to new positions by a fixed rotation."""


@dataclass(frozen=True, eq=False)
class LayerRotary:
    """How one layer rotates its keys: the first `rotary_dim` dims, in pairs, by position x `inv_freq`."""

    inv_freq: torch.Tensor  # (rotary_dim // 2,) float32: the model's frequencies, scaling included
    rotary_dim: int  # the leading dims of head_dim that rotate; the rest pass through (partial rotary)
    convention: str  # HALF or INTERLEAVED: which dims pair up
    attention_scaling: float  # what the model multiplies cos/sin by; already inside every stored key
    rope_type: str  # "default", "linear", "llama3", "yarn" or "longrope"
    # every position of every forward pass must stay below this for `inv_freq` to be what the model
    # uses (LongRoPE switches all of a pass to its long factors once the pass reaches it); None: no limit
    max_positions: int | None = None


@dataclass(frozen=True)
class _Architecture:
    """What one transformers architecture does with RoPE, read from its modeling file."""

    rotary_class: str | None  # "module.Class" whose `compute_default_rope_parameters` gives plain RoPE
    convention: str = HALF
    has_rope: Callable[[object, int], bool] = lambda config, layer_idx: True  # every layer rotates


def _no_rope_layers(config, layer_idx: int) -> bool:
    # SmolLM3, Llama 4: `no_rope_layers[i]` is 1 where the layer *uses* RoPE (`use_rope = no_rope_layers[i]`)
    return bool(config.no_rope_layers[layer_idx])


def _sliding_layers(config, layer_idx: int) -> bool:
    # Cohere 2: only sliding-window layers rotate; full-attention layers have no positions
    return config.layer_types[layer_idx] == "sliding_attention"


def _exaone4_layers(config, layer_idx: int) -> bool:
    # EXAONE 4: global layers of a hybrid (sliding + global) model have no positions
    return config.sliding_window is None or config.layer_types[layer_idx] == "sliding_attention"


_ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture("llama.LlamaRotaryEmbedding"),
    "mistral": _Architecture("mistral.MistralRotaryEmbedding"),
    "ministral": _Architecture("ministral.MinistralRotaryEmbedding"),
    "mixtral": _Architecture("mixtral.MixtralRotaryEmbedding"),
    "qwen2": _Architecture("qwen2.Qwen2RotaryEmbedding"),
    "qwen2_moe": _Architecture("qwen2_moe.Qwen2MoeRotaryEmbedding"),
    "qwen3": _Architecture("qwen3.Qwen3RotaryEmbedding"),
    "qwen3_moe": _Architecture("qwen3_moe.Qwen3MoeRotaryEmbedding"),
    "gemma": _Architecture("gemma.GemmaRotaryEmbedding"),
    "gemma2": _Architecture("gemma2.Gemma2RotaryEmbedding"),
    "gemma3_text": _Architecture("gemma3.Gemma3RotaryEmbedding"),
    "phi": _Architecture("phi.PhiRotaryEmbedding"),
    "phi3": _Architecture("phi3.Phi3RotaryEmbedding"),
    "gpt_neox": _Architecture("gpt_neox.GPTNeoXRotaryEmbedding"),
    "stablelm": _Architecture("stablelm.StableLmRotaryEmbedding"),
    "olmo": _Architecture("olmo.OlmoRotaryEmbedding"),
    "olmo2": _Architecture("olmo2.Olmo2RotaryEmbedding"),
    "olmo3": _Architecture("olmo3.Olmo3RotaryEmbedding"),
    "granite": _Architecture("granite.GraniteRotaryEmbedding"),
    "granitemoe": _Architecture("granitemoe.GraniteMoeRotaryEmbedding"),
    "starcoder2": _Architecture("starcoder2.Starcoder2RotaryEmbedding"),
    "gpt_oss": _Architecture("gpt_oss.GptOssRotaryEmbedding"),  # halves as `rotate_half`, YaRN by default
    "seed_oss": _Architecture("seed_oss.SeedOssRotaryEmbedding"),
    "smollm3": _Architecture("smollm3.SmolLM3RotaryEmbedding", has_rope=_no_rope_layers),
    "exaone4": _Architecture("exaone4.Exaone4RotaryEmbedding", has_rope=_exaone4_layers),
    "cohere": _Architecture("cohere.CohereRotaryEmbedding", INTERLEAVED),
    "cohere2": _Architecture("cohere2.Cohere2RotaryEmbedding", INTERLEAVED, _sliding_layers),
    "glm": _Architecture("glm.GlmRotaryEmbedding", INTERLEAVED),
    "glm4": _Architecture("glm4.Glm4RotaryEmbedding", INTERLEAVED),
    "helium": _Architecture("helium.HeliumRotaryEmbedding", INTERLEAVED),
    "llama4_text": _Architecture("llama4.Llama4TextRotaryEmbedding", INTERLEAVED, _no_rope_layers),
    "gptj": _Architecture(None, INTERLEAVED),  # a fixed sin/cos table of base 10000, no rope_parameters
}


def rotary_layout(config) -> list[LayerRotary | None]:
    """How each layer of the model `config` describes rotates its keys (None: a layer without RoPE).

    Needs only the config, so a run can be refused before the weights load. Raises
    `UnsupportedRope` for an architecture or rope type whose rotation kvcli has not verified to
    compose with a constant shift (dynamic NTK above all).
    """
    config = config.get_text_config()
    arch = _ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise _refusal(f"model type '{config.model_type}' has a rotary embedding kvcli has not verified", config)
    layer_types = getattr(config, "layer_types", None)
    parameters = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    nested = bool(layer_types) and any(isinstance(parameters.get(kind), dict) for kind in set(layer_types))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    by_type: dict[str | None, LayerRotary] = {}  # layers sharing a layer type share one LayerRotary
    layout: list[LayerRotary | None] = []
    for layer_idx in range(config.num_hidden_layers):
        if not arch.has_rope(config, layer_idx):
            layout.append(None)
            continue
        layer_type = layer_types[layer_idx] if nested else None
        if layer_type not in by_type:
            by_type[layer_type] = _layer_rotary(config, arch, parameters, layer_type, head_dim)
        layout.append(by_type[layer_type])
    return layout


def _layer_rotary(config, arch: _Architecture, parameters: dict, layer_type: str | None, head_dim: int) -> LayerRotary:
    """One layer type's rotary, computed as the model's rotary class computes it."""
    if layer_type is not None:
        parameters = parameters.get(layer_type)
        if parameters is None:
            raise _refusal(f"layer type '{layer_type}' has no rope_parameters, which kvcli has not verified", config)
    rope_type = parameters.get("rope_type", "default")
    if "dynamic" in rope_type:
        raise _refusal(f"rope_type '{rope_type}' (dynamic NTK) recomputes its frequencies from the sequence length", config)
    if rope_type not in _FIXED_ROPE_TYPES:
        raise _refusal(f"rope_type '{rope_type}' is not one kvcli has verified", config)
    # called as the model's rotary class calls them: with the layer type only where rope_parameters are per type
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    if rope_type != "default":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, **kwargs)
    elif arch.rotary_class is None:
        inv_freq, scaling = _gptj_frequencies(config), 1.0
    else:
        module, name = arch.rotary_class.split(".")
        rotary_class = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        inv_freq, scaling = rotary_class.compute_default_rope_parameters(config, **kwargs)
    inv_freq = inv_freq.detach().to("cpu", torch.float32)
    rotary_dim = 2 * inv_freq.shape[0]
    if rotary_dim > head_dim:
        raise _refusal(f"rope_type '{rope_type}' rotates {rotary_dim} dims of a {head_dim}-dim head", config)
    max_positions = None
    if rope_type == "longrope" and parameters["long_factor"] != parameters["short_factor"]:
        # transformers uses the short factors while every position is below this, the long ones after
        max_positions = int(parameters["original_max_position_embeddings"])
    return LayerRotary(inv_freq, rotary_dim, arch.convention, float(scaling), rope_type, max_positions)


def _gptj_frequencies(config) -> torch.Tensor:
    """GPT-J's frequencies, as its `create_sinusoidal_positions` builds them."""
    dim = config.rotary_dim or config.hidden_size
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))


def _refusal(what: str, config) -> UnsupportedRope:
    limit = getattr(config, "max_position_embeddings", None)
    within = f"--max-context {limit} or less" if limit else "a --max-context within the model's positions"
    return UnsupportedRope(f"{what}, so kvcli cannot move cached keys to new positions; pass {within} to read within the model's positions instead")


def rerotate(keys: torch.Tensor, positions_from: torch.Tensor, positions_to: torch.Tensor,
             layer_rotary: LayerRotary | None) -> torch.Tensor:
    """Post-RoPE `keys` `(1, num_kv_heads, n, head_dim)` at `positions_from` `(num_kv_heads, n)`,
    returned as the layer would have computed them at `positions_to` (same shape, int64).

    Each head may hold different tokens, so positions are per head. A layer without RoPE
    (`layer_rotary` None) returns `keys` unchanged. Computed in float32 and returned in the
    keys' dtype.
    """
    if layer_rotary is None:
        return keys
    _, num_kv_heads, n, head_dim = keys.shape
    if positions_from.shape != (num_kv_heads, n) or positions_to.shape != (num_kv_heads, n):
        raise ValueError(f"positions must be (num_kv_heads, n) = {(num_kv_heads, n)}, got "
                         f"{tuple(positions_from.shape)} and {tuple(positions_to.shape)}")
    if head_dim < layer_rotary.rotary_dim:
        raise ValueError(f"keys have head_dim {head_dim}, the layer rotates {layer_rotary.rotary_dim} dims")
    limit = layer_rotary.max_positions
    if limit is not None and positions_to.numel() and int(torch.maximum(positions_from, positions_to).max()) >= limit:
        raise UnsupportedRope(
            f"rope_type '{layer_rotary.rope_type}' changes its frequencies at position {limit}, so kvcli cannot "
            f"move cached keys past it; pass --max-context {limit} or less to read within those positions instead")
    cos, sin = _shift(positions_from, positions_to, layer_rotary.inv_freq.to(keys.device))  # a few floats to copy
    half = layer_rotary.rotary_dim // 2
    rot = keys[..., : layer_rotary.rotary_dim].float()
    if layer_rotary.convention == HALF:
        x1, x2 = rot[..., :half], rot[..., half:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    y1 = x1 * cos - x2 * sin  # (1, num_kv_heads, n, rotary_dim // 2)
    y2 = x2 * cos + x1 * sin
    rotated = torch.cat((y1, y2), dim=-1) if layer_rotary.convention == HALF else torch.stack((y1, y2), dim=-1).flatten(-2)
    return torch.cat((rotated.to(keys.dtype), keys[..., layer_rotary.rotary_dim :]), dim=-1)


def _shift(positions_from: torch.Tensor, positions_to: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each entry's rotation, `(1, num_kv_heads, n, rotary_dim // 2)` float32.

    Angles are taken as the model takes them (float32 position x frequency) and subtracted
    through the angle-difference identities rather than as one float32 difference, which would
    round a large angle by more than the model's own cos/sin do.
    """
    old = positions_from.to(inv_freq.device, torch.float32)[..., None] * inv_freq  # (num_kv_heads, n, rotary_dim // 2)
    new = positions_to.to(inv_freq.device, torch.float32)[..., None] * inv_freq
    cos_old, sin_old, cos_new, sin_new = old.cos(), old.sin(), new.cos(), new.sin()
    cos = cos_new * cos_old + sin_new * sin_old  # cos(new - old)
    sin = sin_new * cos_old - cos_new * sin_old  # sin(new - old)
    return cos[None], sin[None]
