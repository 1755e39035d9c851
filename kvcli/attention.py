"""The attention function kvcli registers with transformers, and the window-attention helper.

transformers builds one attention mask for all layers from one layer's length. kvcli's layers
hold different numbers of tokens, so this function ignores that mask and builds each layer's
own: the new `q_len` tokens see every cached entry and each other causally. It also attends
per KV head (grouped-query attention without repeating keys), and after a layer's attention
hands the layer to the step's compressor (`Step.after_attention`, `kvcli/step.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from .step import step_of

ATTN_IMPLEMENTATION = "kvcli"

# Largest (query rows x keys) block materialised at once when scoring all prompt queries (H2O).
_SCORE_BLOCK_ELEMENTS = 1 << 24


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of the last `q_len` positions over `k_len` keys, per KV head.

    query `(1, num_heads, q_len, head_dim)`, key/value `(1, num_kv_heads, k_len, head_dim)`;
    returns `(1, q_len, num_heads, head_dim)` as transformers' attention functions do.
    """
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    if q_len == 1:
        # One new token sees every entry: fold the query heads of each KV head into rows.
        packed = query.reshape(1, num_kv_heads, group, head_dim)
        out = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
        return out.reshape(1, 1, num_heads, value.shape[-1])
    gqa = group > 1
    if q_len == k_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        # Bottom-right aligned causal mask: query i sits at position k_len - q_len + i.
        mask = causal_mask(q_len, k_len, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """`(q_len, k_len)` bool, True where the query may attend (bottom-right aligned)."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return torch.arange(k_len, device=device)[None, :] <= rows


def window_attention(query: torch.Tensor, key: torch.Tensor, window_size: int, scaling: float) -> torch.Tensor:
    """Attention probabilities of the last `window_size` queries over all keys.

    Returns `(num_kv_heads, group, window, k_len)` in float32: the query heads that share a
    KV head sit in one row group, so scores can be aggregated per KV head without ever
    repeating keys. Each row is causal: window query i sees keys up to its own position.
    """
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    window = min(window_size, q_len)
    q = query[0, :, -window:].float().reshape(num_kv_heads, group * window, head_dim)
    logits = torch.bmm(q, key[0].float().transpose(1, 2)) * scaling  # (num_kv_heads, group*window, k_len)
    logits = logits.view(num_kv_heads, group, window, k_len)
    logits.masked_fill_(~causal_mask(window, k_len, key.device), float("-inf"))
    return logits.softmax(dim=-1)


def accumulated_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention each key receives, summed over all queries (H2O's heavy-hitter score).

    Computed in query blocks so the `(q_len, k_len)` matrix is never materialised whole.
    Returns `(num_kv_heads, group, k_len)` float32.
    """
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    keys_t = key[0].float().transpose(1, 2)  # (num_kv_heads, head_dim, k_len)
    total = torch.zeros(num_kv_heads, group, k_len, dtype=torch.float32, device=key.device)
    block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, num_heads * k_len))
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        q = query[0, :, start:stop].float().reshape(num_kv_heads, group * (stop - start), head_dim)
        logits = torch.bmm(q, keys_t).view(num_kv_heads, group, stop - start, k_len) * scaling
        rows = torch.arange(start, stop, device=key.device)[:, None] + (k_len - q_len)
        logits.masked_fill_(torch.arange(k_len, device=key.device)[None, :] > rows, float("-inf"))
        total += logits.softmax(dim=-1).sum(dim=2)
    return total


def kvcli_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: exact attention over a `KVCache`, then compression."""
    step = step_of(kwargs)
    if step is None:
        # Not driven by kvcli (one unpadded sequence, e.g. `model.generate`): plain causal SDPA.
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("sliding_window"):
        raise NotImplementedError("kvcli does not support sliding-window attention layers yet")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(query, key, value, scaling)
    step.after_attention(module.layer_idx, query, scaling)
    return out, None


def _no_mask(*args, **kwargs) -> None:
    """transformers would size one mask from layer 0's length; kvcli builds each layer's own."""
    return None


def register() -> None:
    """Make `attn_implementation="kvcli"` available to every transformers model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvcli_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
