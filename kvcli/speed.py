"""This machine's reading speed: the prefill tokens/s of the last reads of each model, kept in a
small file under KVCLI_HOME so `kvcli plan` can estimate a read's time before any weights load.

Recording is best effort: a home kvcli cannot write, or a damaged file, never fails a read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "speed.json"
KEPT_READS = 10  # per model, device and dtype: the newest replace the oldest
KEPT_MODELS = 50  # the models read most recently (tests read many throwaway ones)
MIN_TOKENS = 64  # shorter reads time the overhead more than the model
# how a read went: a read of the whole prompt measures the prefill; a question after a prefix read earlier does not
TIMED_READS = ("query", "chunked", "reindexed")


def speed_file(home: Path) -> Path:
    """The record under kvcli's home (`models.kvcli_home()`)."""
    return Path(home) / FILE


def _key(model: str, device: str, dtype: str) -> str:
    return f"{model} | {device} | {dtype}"


def names(device, dtype) -> tuple[str, str]:
    """A torch device and dtype as the records name them: ('cuda', 'bfloat16')."""
    return getattr(device, "type", str(device)), str(dtype).removeprefix("torch.")


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_read(home: Path, model: str, device: str, dtype: str, tokens: int, seconds: float) -> None:
    """Add one read of `tokens` prompt tokens in `seconds` to the model's recent reads (best effort)."""
    if tokens < MIN_TOKENS or seconds <= 0:
        return
    from .atomic import write_atomic
    from .errors import OutputError

    path = speed_file(home)
    data = _load(path)
    key = _key(model, device, dtype)
    reads = _reads(data.pop(key, None))
    data[key] = (reads + [[int(tokens), round(float(seconds), 4)]])[-KEPT_READS:]  # last: the most recent
    data = dict(list(data.items())[-KEPT_MODELS:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data))
    except (OSError, OutputError) as exc:  # a read-only or full home (write_atomic says so as an OutputError): the read itself went fine
        log.debug("could not record the read's speed in %s: %s", path, exc)


def _reads(recorded) -> list[list]:
    """The well-formed [tokens, seconds] pairs of one model's record (a damaged file has others)."""
    if not isinstance(recorded, list):
        return []
    return [r for r in recorded if isinstance(r, list) and len(r) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in r)]


@dataclass
class Speed:
    """How fast this machine read prompts with one model: over its last `reads` reads."""

    reads: int
    tokens_per_s: float
    device: str
    dtype: str

    def seconds(self, tokens: int) -> float:
        return tokens / self.tokens_per_s

    def basis(self) -> str:
        """"3 reads of this model on this machine (cpu, float32) at ~250 tokens/s"."""
        return (f"{self.reads} read{'s' if self.reads > 1 else ''} of this model on this machine ({self.device}, {self.dtype}) "
                f"at ~{self.tokens_per_s:,.0f} tokens/s")


def measured_speed(home: Path, model: str, device: str, dtype: str) -> Speed | None:
    """The model's recorded speed on `device` and `dtype` (all tokens over all seconds of its
    recent reads), or None before any read was recorded."""
    reads = _reads(_load(speed_file(home)).get(_key(model, device, dtype)))
    if not reads:
        return None
    return Speed(len(reads), sum(r[0] for r in reads) / sum(r[1] for r in reads), device, dtype)


def clock(seconds: float) -> str:
    """Seconds as a clock: 0:45, 1:20, 1:02:03."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
