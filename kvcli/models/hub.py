"""A hub model fetched into the Hugging Face cache before it is loaded: the files a load needs,
with progress on kvcli's status line, and the hub's refusals said in one line.

transformers would download the same files itself, but silently under kvcli (its bars are
turned off: they would break the status line) and with a many-line error for a gated model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..errors import ModelError

# What a load reads besides the weights: configs, tokenizer files, chat templates.
_SMALL = (".json", ".model", ".tiktoken", ".txt", ".jinja")
_REPORT_EVERY_S = 0.5


def is_cached(spec: str) -> bool:
    """Whether the hub id's config is already in the local Hugging Face cache (nothing to fetch)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec, "config.json"), str)


def files_to_fetch(names: list[str], trust_remote_code: bool = False) -> list[str]:
    """The files of a repository that a load reads: top-level configs and tokenizer files, the
    safetensors weights (the .bin ones only where there are none), the model's code when it may run.
    Folders (original/, onnx/, gguf copies) are left out."""
    top = [name for name in names if "/" not in name]
    safetensors = [name for name in top if name.endswith((".safetensors", ".safetensors.index.json"))]
    weights = safetensors or [name for name in top if name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json"))]
    small = [name for name in top if name.endswith(_SMALL) or name.startswith("tokenizer")]
    code = [name for name in top if name.endswith(".py")] if trust_remote_code else []
    return sorted(set(small) | set(weights) | set(code))


def fetch(spec: str, report: Callable[[str], None], trust_remote_code: bool = False) -> None:
    """Download what loading hub id `spec` reads into the Hugging Face cache, reporting
    `downloading org/name: 3.2 of 16.1 GiB`; nothing when it is cached or the hub is off
    (HF_HUB_OFFLINE). A gated, private or missing model is a one-line ModelError."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HTTPError

    if hub_offline() or is_cached(spec):
        return
    try:
        info = HfApi().model_info(spec, files_metadata=True)
        sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
        names = files_to_fetch(list(sizes), trust_remote_code)
        total = sum(sizes[name] for name in names)
        done = 0
        for index, name in enumerate(names, 1):
            bar = _progress_bar(report, f"downloading {spec}", done, total, f"file {index} of {len(names)}")
            hf_hub_download(spec, name, tqdm_class=bar)
            done += sizes[name]
    except (OSError, HTTPError) as err:  # the hub's refusals are both; a network failure (no DNS, refused, timed out) only the second
        raise ModelError(hub_error(spec, err)) from err


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids the hub (read by huggingface_hub when it is imported)."""
    import huggingface_hub

    return huggingface_hub.constants.HF_HUB_OFFLINE


def hub_error(spec: str, err: BaseException) -> str:
    """One line for what the hub answered: gated (accept the terms, log in), unauthorised or not
    found (a private repository needs a login), or unreachable (pre-download, or a local folder)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(err, GatedRepoError):
        return f"model '{spec}' is gated on the Hugging Face hub: accept its terms on https://huggingface.co/{spec} with your account, then {login}"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RepositoryNotFoundError) or status in (401, 403, 404):
        token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
        return f"model '{spec}' was not found on the Hugging Face hub or needs a login ({token}): check the id, or {login}"
    if isinstance(err, HfHubHTTPError):
        return f"the Hugging Face hub refused to send '{spec}' (HTTP {status}): try again later, or pass a local folder or .gguf file"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"cannot download '{spec}': the Hugging Face hub cannot be reached ({text}); pass -m a local folder or "
            f".gguf file, or download the model beforehand (`hf download {spec}`) on a machine that reaches the hub")


def _progress_bar(report: Callable[[str], None], label: str, done: int, total: int, which: str):
    """A tqdm class for one file's download that reports the bytes of the whole model, throttled."""
    from tqdm import tqdm

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f}"

    class Bar(tqdm):
        last = 0.0

        def __init__(self, *args, **kwargs):
            kwargs.update(disable=False, file=open(os.devnull, "w"))  # kvcli's status line shows it instead
            super().__init__(*args, **kwargs)
            report(f"{label}: {gib(done)} of {gib(total)} GiB ({which})")

        def update(self, n=1):
            result = super().update(n)
            now = time.monotonic()
            if now - Bar.last >= _REPORT_EVERY_S:
                Bar.last = now
                report(f"{label}: {gib(done + int(self.n))} of {gib(total)} GiB ({which})")
            return result

        def close(self):
            file = self.fp
            super().close()
            file.close()

    return Bar
