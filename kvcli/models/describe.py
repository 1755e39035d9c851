"""A model described without loading its weights: its config, its tokenizer and the size of its
weights, for `kvcli plan`.

A folder, a hub id already in the local Hugging Face cache and a converted embedded model are read
from their `config.json`, tokenizer files and safetensors headers (the first bytes of each weights
file); a GGUF, or an embedded model not converted yet, from the GGUF's metadata. Nothing is
downloaded and no weight is read. Without a readable tokenizer the counts are estimated
(`TokenEstimate`), and the description says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from .checkpoints import embedded_target, is_complete, kvcli_home
from .convert import first_line
from .embedded import DEFAULT_MODEL, EMBEDDED, EmbeddedModel
from .load import _looks_like_path

BYTES_PER_TOKEN = 4  # the estimate without a tokenizer: BPE tokenizers give about 4 bytes of English per token
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


@dataclass
class Description:
    """What a model is, known before its weights load."""

    name: str  # what the user asked for: embedded name, folder, .gguf or hub id
    source: str  # the folder or GGUF file that was read
    config: object  # a transformers PretrainedConfig
    tokenizer: object  # the model's tokenizer, or a TokenEstimate
    params: int | None  # the parameters the loaded model holds; None: unknown
    params_from: str  # how `params` was found
    disk_bytes: int | None  # the weights files on disk; None: none found
    stored_as: str  # what those files hold: "F32", "BF16", "GGUF" ...
    notes: list[str] = field(default_factory=list)  # what a user should know (an estimated tokenizer, a conversion to come)

    @property
    def exact_tokens(self) -> bool:
        """Whether token counts come from the model's own tokenizer."""
        return not isinstance(self.tokenizer, TokenEstimate)


def describe_model(spec: str | None = None, trust_remote_code: bool = False, progress: Callable[[str], None] | None = None) -> Description:
    """Describe `spec` (embedded name, checkpoint folder, .gguf file or cached hub id) without its
    weights; `progress(message)` hears of the slow step (a GGUF's metadata, tens of seconds)."""
    spec = spec or os.environ.get("KVCLI_MODEL") or DEFAULT_MODEL
    report = progress or (lambda message: None)
    if spec in EMBEDDED:
        return _embedded(EMBEDDED[spec], trust_remote_code, report)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"model folder {spec} has no config.json: pass a Hugging Face checkpoint folder or a .gguf file")
            return _folder(path, spec, trust_remote_code)
        if path.suffix.lower() == ".gguf":
            report(f"reading the metadata of {path.name} (tens of seconds)")
            with _gguf_folder([path], path.stat().st_size) as gguf:
                described = _gguf(gguf, spec, path.stat().st_size, trust_remote_code)
            described.source = str(path)
            described.notes.append(f"a .gguf is converted once, on first use, into a float32 checkpoint under {kvcli_home() / 'models'}")
            return described
        raise ModelError(f"model path {spec} is not a folder or a .gguf file")
    if _looks_like_path(spec):
        raise ModelError(f"model path {spec} does not exist")
    if "/" not in spec:
        raise ModelError(f"unknown model '{spec}': use an embedded model ({', '.join(EMBEDDED)}), a hub id like org/name, a checkpoint folder or a .gguf file")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model '{spec}' is not in the local Hugging Face cache ({first_line(err)}); kvcli plan downloads nothing: "
            "pass a local folder or .gguf file, or download the model first"
        ) from err
    if not (folder / "config.json").is_file():
        raise ModelError(f"the cached copy of '{spec}' has no config.json")
    return _folder(folder, spec, trust_remote_code)


def _embedded(embedded: EmbeddedModel, trust_remote_code: bool, report: Callable[[str], None]) -> Description:
    """A converted embedded model from its checkpoint; one not converted yet from its GGUF's metadata."""
    target = embedded_target(embedded, kvcli_home())
    if is_complete(target):
        return _folder(target, embedded.name, trust_remote_code)
    parts = embedded.part_paths()  # a missing package is one line saying how to install it
    report(f"reading the GGUF metadata of {embedded.name}, which is not converted yet (tens of seconds)")
    with _gguf_folder(parts, embedded.size) as gguf:
        described = _gguf(gguf, embedded.name, embedded.size, trust_remote_code)
    described.source = f"its GGUF, not converted yet: {len(parts)} installed part{'s' if len(parts) > 1 else ''}"
    described.notes.append(
        f"{embedded.name} is not converted yet, so this plan read its GGUF's metadata; the first run that loads it checks "
        f"its sha256 and converts it once into a float32 checkpoint under {target.parent} "
        "(86 s for the default model on two CPU cores)"
    )
    return described


def _folder(folder: Path, name: str, trust_remote_code: bool) -> Description:
    """A checkpoint folder: config.json, the tokenizer files and the safetensors headers."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot read the config of model {name} in {folder}: {first_line(err)}") from err
    _check_config(config, name)
    notes: list[str] = []
    tokenizer = _tokenizer(folder, name, trust_remote_code, notes)
    params, stored_as = _safetensors_params(folder)
    params_from = "the safetensors headers"
    if params is None:
        params, params_from = _params_of(config, trust_remote_code), "the config (no readable safetensors header)"
    sizes = [p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
    return Description(name, str(folder), config, tokenizer, params, params_from, sum(sizes) if sizes else None, stored_as, notes)


def _gguf(gguf: Path, name: str, size: int, trust_remote_code: bool) -> Description:
    """A GGUF's config and tokenizer from its metadata; the parameters from a model built on the meta device."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    folder, file = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        _check_config(config, name)
        # The tokenizer's class, given directly: AutoTokenizer would parse the GGUF again for the config.
        known = {"tokenizer_type": config.model_type} if TOKENIZER_MAPPING_NAMES.get(config.model_type) else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, **known)
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as err:
        raise ModelError(f"cannot read the metadata of {name} as a GGUF: {first_line(err)}") from err
    return Description(name, str(gguf), config, tokenizer, _params_of(config, trust_remote_code), "the config", size, "GGUF")


@contextlib.contextmanager
def _gguf_folder(parts: list[Path], size: int):
    """The GGUF made of `parts`, as a file alone in a temp folder (transformers reads what sits beside it).

    One part is linked. Several are stood up without joining them: the first part (the metadata
    lies at the start of the file) in a sparse file of the whole size, the rest holes that are
    never read, since only the metadata is.
    """
    with tempfile.TemporaryDirectory(prefix="kvcli-plan-") as workdir:
        gguf = Path(workdir) / "model.gguf"
        if len(parts) == 1:
            try:
                gguf.symlink_to(parts[0].resolve())
            except OSError:
                shutil.copyfile(parts[0], gguf)
        else:
            with gguf.open("wb") as out, parts[0].open("rb") as first:
                shutil.copyfileobj(first, out)
                out.truncate(size)
        yield gguf


def _check_config(config, name: str) -> None:
    if not getattr(config, "num_hidden_layers", None):
        raise ModelError(f"the config of model {name} has no num_hidden_layers: kvcli reads decoder-only text models")


def _tokenizer(folder: Path, name: str, trust_remote_code: bool, notes: list[str]):
    """The folder's tokenizer (tokenizer.json, or a tiktoken or sentencepiece `tokenizer.model`), else an estimate."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as err:
        notes.append(
            f"model {name} has no tokenizer kvcli can read ({first_line(err)}): token counts are estimated at "
            f"{BYTES_PER_TOKEN} bytes of UTF-8 text per token, without the model's chat template"
        )
        return TokenEstimate()


def _safetensors_params(folder: Path) -> tuple[int | None, str]:
    """(parameters, stored dtypes) from the headers of the folder's safetensors files; (None, "") when
    there are none or one is unreadable."""
    files = sorted(folder.glob("*.safetensors"))
    total, dtypes = 0, set()
    for path in files:
        try:
            header = read_safetensors_header(path)
            total += sum(math.prod(entry["shape"]) for entry in header.values())
            dtypes.update(entry["dtype"] for entry in header.values())
        except (OSError, ValueError, KeyError, TypeError):
            return None, ""
    if not files:
        return None, ""
    return total, "+".join(sorted(dtypes))


def read_safetensors_header(path: Path) -> dict:
    """`{tensor name: {"dtype", "shape", "data_offsets"}}` from a safetensors file's header, without its data."""
    with path.open("rb") as src:
        head = src.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, path.stat().st_size - 8):
            raise ValueError(f"{path.name} is not a safetensors file")
        header = json.loads(src.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has no safetensors header")
    return {key: value for key, value in header.items() if key != "__metadata__"}


def _params_of(config, trust_remote_code: bool) -> int | None:
    """The parameters of the model `config` describes, counted on the meta device (no memory, no weights); None if it cannot be built."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, ImportError, RuntimeError, OSError, AttributeError):
        return None
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


class TokenEstimate:
    """Stands in for a tokenizer a model does not ship: one token per `BYTES_PER_TOKEN` bytes of
    UTF-8 text, so that the prompt layout runs as with a real tokenizer and gives estimated counts.

    About what BPE tokenizers make of English prose; code, numbers and other scripts differ
    (often more tokens). There is no chat template, so the prompt is the plain layout.
    """

    chat_template = None

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        spans = _byte_spans(text)
        ids = [self._id(text[start:end]) for start, end in spans]
        return {"input_ids": ids, "offset_mapping": spans} if return_offsets_mapping else {"input_ids": ids}

    def decode(self, ids) -> str:
        return "".join(self._pieces[int(i)] for i in ids)

    def _id(self, piece: str) -> int:
        if piece not in self._ids:
            self._ids[piece] = len(self._pieces)
            self._pieces.append(piece)
        return self._ids[piece]


def _byte_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of at most `BYTES_PER_TOKEN` UTF-8 bytes each (one character
    at least), so the estimate errs towards more tokens, never fewer than bytes / 4."""
    if text.isascii():
        return [(i, min(i + BYTES_PER_TOKEN, len(text))) for i in range(0, len(text), BYTES_PER_TOKEN)]
    spans, start, size = [], 0, 0
    for i, char in enumerate(text):
        width = len(char.encode("utf-8", "surrogatepass"))
        if size and size + width > BYTES_PER_TOKEN:
            spans.append((start, i))
            start, size = i, 0
        size += width
    if start < len(text):
        spans.append((start, len(text)))
    return spans


__all__ = ["BYTES_PER_TOKEN", "Description", "TokenEstimate", "describe_model", "read_safetensors_header"]
