"""The attention function kvcli registers with transformers, and the window-attention helpers.

transformers builds one attention mask for all layers from one layer's length. kvcli's layers
hold different numbers of tokens, so this function ignores that mask and builds each layer's
own: the new `q_len` tokens see every cached entry and each other causally, and a
sliding-window layer's tokens see only the last `sliding_window` positions (themselves
included). It also attends per KV head (grouped-query attention without repeating keys), and
after a layer's attention hands the layer to the step (`Step.after_attention`, `kvcli/step.py`),
where a compressor prunes it and a sliding-window layer drops what no later token can see.

Everything a model tells its attention function besides q, k, v is honoured or refused: the
scaling, logit softcapping (Gemma 2), attention sinks (gpt-oss), the sliding window (Mistral,
Gemma 2/3, Cohere 2, gpt-oss). An argument kvcli does not know is refused (`UnsupportedAttention`),
never ignored. Query/key norms and RoPE happen in the model before this function is called.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from . import decode_kernel, flash
from .errors import KvcliError
from .step import STEP_KWARG, step_of

ATTN_IMPLEMENTATION = "kvcli"

# Largest (query rows x keys) block materialised at once when scoring all prompt queries (H2O)
# or attending with softcapping or sinks, which SDPA cannot do.
_SCORE_BLOCK_ELEMENTS = 1 << 24

# Keyword arguments transformers' attention layers pass that do not change what a layer attends to.
_INERT_KWARGS = frozenset({STEP_KWARG, "position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits", "return_dict"})


class UnsupportedAttention(KvcliError):
    """The model's attention does something kvcli's attention function cannot do exactly."""


@dataclass(frozen=True, eq=False)
class LayerAttention:
    """What one layer's attention does besides softmax(q.k): what transformers passes the attention function."""

    scaling: float
    softcap: float | None = None  # logits become softcap * tanh(logits / softcap) (Gemma 2)
    sinks: torch.Tensor | None = None  # (num_heads,) a learned logit per query head in every softmax, attending to nothing (gpt-oss)
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 positions before it; None: every earlier one

    @property
    def exact_in_sdpa(self) -> bool:
        """Whether torch's fused attention computes this layer exactly (no softcapping, no sinks)."""
        return self.softcap is None and self.sinks is None

    def probabilities(self, dots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Attention probabilities from raw products `dots` `(num_kv_heads, group, n, k_len)` float32
        (overwritten), where `visible` `(n, k_len)` bool says which keys each query row may see."""
        logits = dots.mul_(self.scaling)
        if self.softcap is not None:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        logits.masked_fill_(~visible, float("-inf"))
        if self.sinks is None:
            return logits.softmax(dim=-1)
        num_kv_heads, group, n, _ = logits.shape
        sink = self.sinks.to(logits.device, torch.float32).view(num_kv_heads, group, 1, 1).expand(-1, -1, n, 1)
        return torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]


def layer_attention(attn: LayerAttention | float) -> LayerAttention:
    """`attn` as a `LayerAttention` (a bare float is a plain layer's scaling)."""
    return attn if isinstance(attn, LayerAttention) else LayerAttention(scaling=float(attn))


def causal_mask(q_len: int, k_len: int, device, window: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """`(stop - start, k_len)` bool, True where query rows start..stop of the last `q_len` may attend
    (bottom-right aligned); with `window`, only the last `window` positions up to the query's own.

    A sliding-window layer holds an unbroken run of the latest tokens (it is never compressed),
    so a key's index is its distance from the query, whatever its position."""
    stop = q_len if stop is None else stop
    rows = torch.arange(start, stop, device=device)[:, None] + (k_len - q_len)
    keys = torch.arange(k_len, device=device)[None, :]
    visible = keys <= rows
    if window is not None:
        visible &= keys > rows - window
    return visible


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn: LayerAttention | float) -> torch.Tensor:
    """Causal attention of the last `q_len` positions over `k_len` keys, per KV head.

    query `(1, num_heads, q_len, head_dim)`, key/value `(1, num_kv_heads, k_len, head_dim)`;
    returns `(1, q_len, num_heads, head_dim)` as transformers' attention functions do. `attn`
    is the layer's `LayerAttention` (or a bare scaling).
    """
    attn = layer_attention(attn)
    out = flash.attend(query, key, value, attn)  # flash-attn where it computes this call exactly (kvcli/flash.py)
    if out is not None:
        return out
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    # the window only hides keys when some query has more than `window` keys up to its own
    window = attn.sliding_window if attn.sliding_window is not None and k_len > attn.sliding_window else None
    if not attn.exact_in_sdpa:
        return _attend_in_blocks(query, key, value, attn, window)
    scaling = attn.scaling
    if q_len == 1 and window is None:
        # One new token sees every entry: fold the query heads of each KV head into rows.
        packed = query.reshape(1, num_kv_heads, group, head_dim)
        out = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
        return out.reshape(1, 1, num_heads, value.shape[-1])
    gqa = group > 1
    if q_len == k_len and window is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        # Bottom-right aligned causal mask: query i sits at position k_len - q_len + i.
        mask = causal_mask(q_len, k_len, query.device, window)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def attend_heads(query: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor]], attn: LayerAttention | float) -> torch.Tensor:
    """`attend` over a packed layer: KV head h's `heads[h]` = (keys, values) `(1, 1, n_h, head_dim)`
    hold different numbers of entries, so each KV head attends with its own query heads over its
    own entries (the new `q_len` ones last, as in `attend`); no head is padded to the longest.

    query `(1, num_heads, q_len, head_dim)`; returns `(1, q_len, num_heads, head_dim)`.
    """
    attn = layer_attention(attn)
    _, num_heads, _, head_dim = query.shape
    group = num_heads // len(heads)
    if _decode_step_off_cuda(query, attn):
        # each KV head's query heads are the rows of one SDPA call; no call of `attend` per head,
        # whose checks would cost a packed layer more than its attention
        rows = query.reshape(1, len(heads), group, head_dim)
        outs = [F.scaled_dot_product_attention(rows[:, h : h + 1], key, value, scale=attn.scaling)
                for h, (key, value) in enumerate(heads)]  # (1, 1, group, v_dim) each
        return torch.cat(outs, dim=1).reshape(1, 1, num_heads, -1)
    outs = []
    for h, (key, value) in enumerate(heads):
        rows = slice(h * group, (h + 1) * group)
        # the sinks are one logit per query head: each KV head's group takes its own
        head_attn = attn if attn.sinks is None else replace(attn, sinks=attn.sinks[rows])
        outs.append(attend(query[:, rows], key, value, head_attn))  # (1, q_len, group, head_dim)
    return torch.cat(outs, dim=2)


def _decode_step_off_cuda(query: torch.Tensor, attn: LayerAttention) -> bool:
    """One new token off CUDA (where flash-attn may take each call) on a layer SDPA computes
    exactly, with no sliding window: it sees every entry, so a packed layer needs no mask."""
    return query.shape[2] == 1 and attn.exact_in_sdpa and attn.sliding_window is None and not query.is_cuda


def attend_packed(query: torch.Tensor, layer, attn: LayerAttention | float) -> torch.Tensor:
    """`attend_heads` over a packed `KVLayer`: a CPU decode step reads the layer's pool with
    kvcli's kernel, every KV head in one call (kvcli/decode_kernel.py) where it runs."""
    attn = layer_attention(attn)
    if _decode_step_off_cuda(query, attn) and query.dtype == torch.bfloat16 and decode_kernel.name() == decode_kernel.KVCLI:
        rows = layer.pooled_rows()
        if rows is not None:
            out = decode_kernel.attend_pool(query, *rows, attn.scaling)
            if out is not None:
                return out
    return attend_heads(query, layer.head_views(), attn)


def _attend_in_blocks(query, key, value, attn: LayerAttention, window: int | None) -> torch.Tensor:
    """`attend` for what SDPA cannot do (softcapping, sinks): the probabilities computed in
    float32, in query blocks so that the `(q_len, k_len)` matrix is never held whole."""
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    keys_t = key[0].float().transpose(1, 2)  # (num_kv_heads, head_dim, k_len)
    values = value[0][:, None]  # (num_kv_heads, 1, k_len, v_dim)
    out = query.new_empty((1, q_len, num_heads, value.shape[-1]))
    block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, num_heads * k_len))
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        q = query[0, :, start:stop].float().reshape(num_kv_heads, group * (stop - start), head_dim)
        dots = torch.bmm(q, keys_t).view(num_kv_heads, group, stop - start, k_len)
        probs = attn.probabilities(dots, causal_mask(q_len, k_len, key.device, window, start, stop))
        # as transformers' eager attention: float32 probabilities, applied in the values' dtype
        rows = torch.matmul(probs.to(values.dtype), values)  # (num_kv_heads, group, stop - start, v_dim)
        out[0, start:stop] = rows.reshape(num_heads, stop - start, -1).transpose(0, 1)
    return out


def window_attention(query: torch.Tensor, key: torch.Tensor, window_size: int, attn: LayerAttention | float) -> torch.Tensor:
    """Attention probabilities of the last `window_size` queries over all keys.

    Returns `(num_kv_heads, group, window, k_len)` in float32: the query heads that share a
    KV head sit in one row group, so scores can be aggregated per KV head without ever
    repeating keys. Each row is the layer's own attention (`attn`: scaling, softcapping, sinks,
    window): window query i sees keys up to its own position.
    """
    attn = layer_attention(attn)
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    window = min(window_size, q_len)
    q = query[0, :, -window:].float().reshape(num_kv_heads, group * window, head_dim)
    dots = torch.bmm(q, key[0].float().transpose(1, 2)).view(num_kv_heads, group, window, k_len)
    return attn.probabilities(dots, causal_mask(window, k_len, key.device, attn.sliding_window))


def accumulated_attention(query: torch.Tensor, key: torch.Tensor, attn: LayerAttention | float) -> torch.Tensor:
    """Attention each key receives, summed over all queries (H2O's heavy-hitter score).

    Computed in query blocks so the `(q_len, k_len)` matrix is never materialised whole.
    Returns `(num_kv_heads, group, k_len)` float32.
    """
    attn = layer_attention(attn)
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    keys_t = key[0].float().transpose(1, 2)  # (num_kv_heads, head_dim, k_len)
    total = torch.zeros(num_kv_heads, group, k_len, dtype=torch.float32, device=key.device)
    block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, num_heads * k_len))
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        q = query[0, :, start:stop].float().reshape(num_kv_heads, group * (stop - start), head_dim)
        dots = torch.bmm(q, keys_t).view(num_kv_heads, group, stop - start, k_len)
        total += attn.probabilities(dots, causal_mask(q_len, k_len, key.device, attn.sliding_window, start, stop)).sum(dim=2)
    return total


def read_layer_attention(module, query: torch.Tensor, attention_mask, scaling, dropout, kwargs: dict) -> LayerAttention:
    """The `LayerAttention` a model's call to its attention function describes; refuses what kvcli cannot do."""
    name = type(module).__name__
    if attention_mask is not None:
        raise UnsupportedAttention(f"{name} builds its own attention mask, which kvcli's per-layer attention cannot follow")
    if getattr(module, "is_causal", True) is False:
        raise UnsupportedAttention(f"{name} attends in both directions; kvcli reads with causal attention only")
    if dropout:
        raise UnsupportedAttention(f"{name} applies attention dropout {dropout}: the model is in training mode")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _INERT_KWARGS and k not in ("sliding_window", "softcap", "s_aux"))
    if unknown:
        raise UnsupportedAttention(f"{name} passes {', '.join(unknown)} to its attention function, which kvcli does not implement")
    window = kwargs.get("sliding_window")
    if window is not None and int(window) < 1:
        raise UnsupportedAttention(f"{name} has a sliding window of {window} tokens")
    softcap = kwargs.get("softcap")
    return LayerAttention(
        scaling=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
        softcap=float(softcap) if softcap else None,
        sinks=kwargs.get("s_aux"),
        sliding_window=int(window) if window is not None else None,
    )


def kvcli_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: exact attention over a `KVCache`, then compression."""
    attn = read_layer_attention(module, query, attention_mask, scaling, dropout, kwargs)
    step = step_of(kwargs)
    if query.shape[0] != 1:
        if step is None and attn.exact_in_sdpa and attn.sliding_window is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        raise UnsupportedAttention("kvcli's attention runs one sequence at a time (batch size 1)")
    layer = step.cache.layers[module.layer_idx] if step is not None else None
    if layer is not None and layer.packed:  # KV heads of unequal lengths: the cache handed the model no keys
        out = attend_packed(query, layer, attn)
    else:
        out = attend(query, key, value, attn)
    if step is not None:  # None: not driven by kvcli (e.g. `model.generate` on a prepared model)
        step.after_attention(module.layer_idx, query, attn)
    return out, None


def _no_mask(*args, **kwargs) -> None:
    """transformers would size one mask from layer 0's length; kvcli builds each layer's own."""
    return None


def register() -> None:
    """Make `attn_implementation="kvcli"` available to every transformers model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvcli_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


@dataclass(frozen=True)
class ModelAttention:
    """How every layer of a model attends, as far as reading it goes: which layers are sliding-window
    layers, and whether its attention reaches kvcli's function at all. `generate.prepare_model`
    finds it by a probe through the function; `from_config` predicts it before the weights load."""

    windows: tuple[int | None, ...]  # per layer: a sliding-window layer's window; None for a global layer
    bypassed: bool = False  # the model attends on its own (Falcon, StableLM): only the full cache can be read
    model_name: str = "this model"  # the model's class, for messages

    @classmethod
    def of_layers(cls, layers: list[LayerAttention | None], model_name: str) -> ModelAttention:
        """From each layer's probed `LayerAttention` (None: the layer never reached kvcli's function)."""
        if any(layer is None for layer in layers):
            return cls(tuple([None] * len(layers)), bypassed=True, model_name=model_name)
        return cls(tuple(layer.sliding_window for layer in layers), model_name=model_name)

    @classmethod
    def from_config(cls, config) -> ModelAttention:
        """The prediction from a config alone (`kvcli plan`, checks before loading), which the probe
        replaces once the model is loaded; tests/test_architectures.py checks the two agree.
        Sliding layers are the `layer_types` marked "sliding_attention" (Gemma 2/3, Cohere 2,
        gpt-oss, Qwen 2 with use_sliding_window), or every layer when only `sliding_window` is set
        (Mistral, Phi-3); a model class that does not take custom attention functions bypasses kvcli's."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        name = model_class.__name__ if model_class is not None else config.model_type
        text = config.get_text_config()
        num_layers = text.num_hidden_layers
        if model_class is not None and not getattr(model_class, "_supports_attention_backend", True):
            return cls(tuple([None] * num_layers), bypassed=True, model_name=name)
        window = getattr(text, "sliding_window", None) or None
        types = getattr(text, "layer_types", None)
        if types:
            windows = [window if kind == "sliding_attention" else None for kind in types]
        elif getattr(text, "use_sliding_window", True):
            windows = [window] * num_layers
        else:
            windows = [None] * num_layers
        return cls(tuple(int(w) if w is not None else None for w in windows), model_name=name)

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @property
    def compressed_layers(self) -> list[int]:
        """The layers a method compresses: every global-attention layer (sliding-window layers keep their window)."""
        return [i for i, window in enumerate(self.windows) if window is None]

    @property
    def most_in_window(self) -> int:
        """The most entries a sliding-window layer keeps after a step (its window less the newest token); 0 without any."""
        return max((window - 1 for window in self.windows if window is not None), default=0)

    def cannot_compress(self) -> str:
        """Why no method can compress this model's cache, or "" when it can."""
        if self.bypassed:
            return "this architecture's attention does not go through transformers' attention interface: running with the full cache"
        if not self.compressed_layers:
            sizes = sorted(set(self.windows))
            return (f"every layer of {self.model_name} attends over a sliding window ({', '.join(map(str, sizes))} tokens) "
                    "and keeps only that window: there is no global layer to compress")
        return ""
