"""Run statistics: a dataclass for `--json`, and a Rich rendering for people."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on a GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class RunStats:
    """What one `ask`/`summarize`/`inspect` run did and cost. Keys are documented in docs/json.md."""

    model: str
    method: str
    method_params: dict
    ratio: float  # fraction of the prompt's KV entries kept, summed over layers
    budget: float  # mean tokens kept per layer (window included)
    prompt_tokens: int
    compressed: bool
    note: str  # why compression was skipped, or ""
    window_text: str  # what the observation window covers
    retained_per_layer: list[int]  # tokens kept per layer after prefill, window included
    kv_bytes_full: int
    kv_bytes_kept: int
    peak_memory_bytes: int
    load_s: float
    prefill_s: float
    ttft_s: float | None = None
    decode_tokens: int = 0
    decode_s: float = 0.0
    dropped_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float | None:
        # The first token comes from the prefill's logits; the rest from decode steps.
        steps = self.decode_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        data["kv_kept_fraction"] = self.kv_bytes_kept / self.kv_bytes_full if self.kv_bytes_full else None
        return data


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def layer_bars(counts: list[int], width: int = 40) -> Table:
    """Kept tokens per layer as horizontal bars, one row per layer."""
    table = Table(box=None, show_header=True, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("")
    top = max(counts) if counts else 1
    for i, n in enumerate(counts):
        bar = "█" * max(1 if n else 0, round(width * n / top))
        table.add_row(str(i), str(n), Text(bar, style="cyan"))
    return table


def render(stats: RunStats) -> Group:
    """The compact report printed on stderr after an answer."""
    head = Text()
    params = ", ".join(f"{k}={v}" for k, v in stats.method_params.items())
    head.append(f"{stats.method}", style="bold")
    head.append(f"({params})  model {stats.model}\n" if params else f"  model {stats.model}\n")
    head.append(f"prompt {stats.prompt_tokens} tokens")
    if stats.dropped_tokens:
        head.append(f" ({stats.dropped_tokens} cut from the middle)", style="yellow")
    if stats.compressed:
        head.append(f"; budget {stats.budget:.1f} tokens/layer = ratio {stats.ratio:.4f}")
        head.append(f"; window {len(stats.window_text) and ''}covers {stats.window_text!r}\n")
    else:
        head.append(f"; not compressed: {stats.note}\n")
    kept_pct = 100 * stats.kv_bytes_kept / stats.kv_bytes_full if stats.kv_bytes_full else 100.0
    head.append(
        f"KV cache {_mib(stats.kv_bytes_kept)} kept of {_mib(stats.kv_bytes_full)} full ({kept_pct:.1f}%), "
        f"saved {_mib(stats.kv_bytes_full - stats.kv_bytes_kept)}; peak memory {_mib(stats.peak_memory_bytes)}\n"
    )
    rate = stats.decode_tokens_per_s
    head.append(
        f"load {stats.load_s:.2f}s  prefill {stats.prefill_s:.2f}s"
        + (f"  first token {stats.ttft_s:.2f}s" if stats.ttft_s is not None else "")
        + (f"  decode {rate:.2f} tokens/s ({stats.decode_tokens} tokens)" if rate else "")
    )
    return Group(head, Text("retained tokens per layer (window included):"), layer_bars(stats.retained_per_layer))
