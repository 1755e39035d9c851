"""What identifies a loaded model: its architecture (`config_hash`) and its weights (`weights_fingerprint`).

Saved KV caches are checked against both; retrieval-head profiles and eval logs are keyed by the
config hash.
"""

from __future__ import annotations

import hashlib
import json
import re

import torch

# Config keys that say how a checkpoint was saved or loaded, not which model it is.
_CONFIG_KEYS_NOT_HASHED = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
    "attn_implementation",
}

# Rows of each sampled weight that the weights fingerprint reads (about 22k values for Qwen2.5-0.5B).
_FINGERPRINT_ROWS = 8


def config_hash(config) -> str:
    """sha256 of a model config's identifying fields; the same whatever dtype or path it was loaded with."""
    fields = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in _CONFIG_KEYS_NOT_HASHED
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the first rows of a few fixed weights: the embedding, the first weight of the
    first and of the last decoder layer, and the model's last weight (final norm or output head).

    Reads a few tens of thousands of values, on the CPU (~3 ms for SmolLM2-135M). Values are
    rounded to bfloat16 before hashing: a float32 load and a bfloat16 load of the same checkpoint
    then agree (exactly: both are float32-to-bfloat16 round-to-nearest of the same numbers), which
    hashing float32 values would not, since dequantized GGUF weights are not exact in bfloat16.
    A float16 load of float32 weights rounds differently (about 6% of the values differ) and gets
    another fingerprint; it matches other float16 loads only. Only these rows are read, so a
    fine-tune that changed none of them (say, adapters on other projections only) goes unnoticed.
    """
    named = [(name, param) for name, param in model.named_parameters() if param.ndim >= 1]
    if not named:
        raise ValueError("the model has no weights to fingerprint")
    sampled = [model.get_input_embeddings().weight]
    # decoder layers are the numbered modules: model.layers.0.self_attn.q_proj.weight, ...
    numbered = [(int(match.group(1)), param) for name, param in named if (match := re.search(r"\.(\d+)\.", name))]
    if numbered:
        first, last = min(i for i, _ in numbered), max(i for i, _ in numbered)
        sampled += [next(p for i, p in numbered if i == first), next(p for i, p in numbered if i == last)]
    sampled.append(named[-1][1])
    digest = hashlib.sha256()
    for weight in sampled:
        rows = weight.detach()[:_FINGERPRINT_ROWS].to("cpu").to(torch.bfloat16).contiguous()
        digest.update(json.dumps(list(weight.shape)).encode())
        digest.update(rows.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
