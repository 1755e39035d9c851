"""Retrieval-head profiles: which attention heads find a fact the question asks for.

On small models a few heads in the middle layers rank a needed fact far above the rest of
the prompt, while most layers rank it in the thousands. A profile finds those heads once per
model, without any user data: synthetic lookups (a random code for a random object, placed
in real prose, asked for at the end) are prefilled, and each query head is scored by how
highly its pooled window attention ranks the code's tokens. The profile is stored under
`KVCLI_HOME/profiles/` (written atomically, under a file lock) and reused.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from .atomic import write_atomic
from .methods.base import pool_scores

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
_OBJECTS = ["lighthouse", "greenhouse", "observatory", "boathouse", "granary", "chapel", "armory", "bakery", "foundry", "apiary", "aviary", "distillery"]
_LENGTHS = (1200, 1800, 2400)
_DEPTHS = (0.2, 0.5, 0.8)


@dataclass
class RetrievalProfile:
    """A score per (layer, query head): higher ranks the asked-for fact higher."""

    scores: list[list[float]]  # [layer][query head]: mean of -log2(rank + 1) over the probes
    model: str
    version: int = PROFILE_VERSION

    def top_heads(self, count: int, max_layer: int | None = None) -> list[tuple[int, int]]:
        """The `count` best (layer, query head) pairs, optionally only up to layer `max_layer`."""
        pairs = [
            (score, layer, head)
            for layer, row in enumerate(self.scores)
            for head, score in enumerate(row)
            if max_layer is None or layer <= max_layer
        ]
        pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
        return [(layer, head) for _, layer, head in pairs[:count]]

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "model": self.model, "scores": self.scores})

    @classmethod
    def from_json(cls, text: str) -> RetrievalProfile:
        data = json.loads(text)
        return cls(scores=data["scores"], model=data["model"], version=data["version"])


def _prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def _probe(rng: random.Random, prose: str, tokenizer, length: int, depth: float, offset: int):
    """A haystack of ~`length` tokens with one synthetic fact; returns (document, question, fact)."""
    obj = rng.choice(_OBJECTS)
    code = "".join(rng.choice("0123456789") for _ in range(6))
    fact = f"The access code for the {obj} is {code}."
    ids = tokenizer(prose[offset : offset + 12 * length], add_special_tokens=False)["input_ids"][:length]
    body = tokenizer.decode(ids)
    at = body.rfind(". ", 0, int(len(body) * depth))
    at = 0 if at < 0 else at + 2
    return body[:at] + fact + " " + body[at:], f"What is the access code for the {obj}?", code


def compute_profile(model, tokenizer, name: str, window_size: int = 8, kernel_size: int = 7, seed: int = 0, progress=None) -> RetrievalProfile:
    """Prefill synthetic lookups and score every query head by where it ranks the fact.

    `progress(done, total)` is called before the first lookup and after each.
    """
    from .generate import capture
    from .prompt import build_prompt

    rng = random.Random(seed)
    prose = _prose()
    config = model.config
    device = next(model.parameters()).device
    totals = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    # a model with few positions is probed within them (the prompt adds ~30 tokens to a probe)
    most = max(64, int(getattr(config, "max_position_embeddings", 0) or 1 << 30) - 64)
    cases = [(min(length, most), depth) for length in _LENGTHS for depth in _DEPTHS]
    if progress:
        progress(0, len(cases))
    for index, (length, depth) in enumerate(cases):
        offset = rng.randrange(0, max(1, len(prose) - 12 * length))
        document, question, code = _probe(rng, prose, tokenizer, length, depth, offset)
        prompt = build_prompt(tokenizer, document, question, max_context=length + 256)
        start = document.index(code)
        fact_positions = [
            p for p in range(len(prompt))
            if (offset_ := prompt.doc_offset(p)) is not None and start <= offset_ < start + len(code)
        ]
        cap = capture(model, prompt.ids.to(device), window_size)
        # one observation per layer a method compresses, in order: the profile is indexed as methods see them
        for rank, obs in enumerate(cap.observations):
            k_len = obs.k_len
            attn = obs.window_attn[:, :, -window_size:, : k_len - window_size].sum(dim=2)  # (num_kv_heads, group, k)
            pooled = pool_scores(attn, kernel_size, "avg").flatten(0, 1)  # (num_heads, k)
            best = pooled[:, fact_positions].max(dim=1).values  # (num_heads,)
            place = (pooled > best[:, None]).sum(dim=1).float()
            totals[rank] += -torch.log2(place + 1).cpu()
        if progress:
            progress(index + 1, len(cases))
    return RetrievalProfile(scores=(totals[: len(cap.observations)] / len(cases)).tolist(), model=name)


def profile_path(name: str, config_hash: str) -> Path:
    """Where the profile of model `name` (with this config hash) is cached under KVCLI_HOME."""
    from .models import kvcli_home

    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in name.strip("/").replace("/", "_"))[-60:]
    return kvcli_home() / "profiles" / f"{safe}-{config_hash[:12]}-v{PROFILE_VERSION}.json"


PACKAGED = Path(__file__).resolve().parent / "data" / "profiles"


def stored_profile(name: str, config_hash: str) -> RetrievalProfile | None:
    """The shipped or cached profile of a model, or None when it must be computed."""
    path = profile_path(name, config_hash)
    for candidate in (PACKAGED / path.name, path):
        if candidate.is_file():
            return RetrievalProfile.from_json(candidate.read_text())
    return None


def load_or_compute_profile(lm, progress=None) -> RetrievalProfile:
    """The retrieval-head profile of a loaded model (`models.LoadedModel`): shipped for the
    embedded models, else computed once and cached.

    Computing takes 9 prefills of 1-2K tokens (about a minute on the default model on a
    CPU); `progress(done, total)` hears of it from the start, so a caller can say so.
    """
    found = stored_profile(lm.name, lm.config_hash)
    if found is not None:
        return found
    from .models.checkpoints import home_folder

    path = profile_path(lm.name, lm.config_hash)
    home_folder(path.parent.name)  # checked before the minute of prefills, as the profile is saved after them
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # another process made it while we waited
            return RetrievalProfile.from_json(path.read_text())
        log.info("computing the retrieval-head profile of %s (once)", lm.name)
        profile = compute_profile(lm.model, lm.tokenizer, lm.name, progress=progress)
        write_atomic(path, profile.to_json())
    return profile
