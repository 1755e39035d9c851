"""Where and how a model runs: the device, the compute dtype, the attention kernel, and a
device map that splits a model over GPUs, the CPU and disk."""

from __future__ import annotations

import re
from importlib.util import find_spec

import torch

from ..errors import ModelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# accelerate's placement strategies that `--device-map` takes: each fills the GPUs (in its own
# order), then the CPU's memory, then offloads what is left to disk.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def mps_available() -> bool:
    """Whether this machine has an Apple GPU that torch can use (Metal Performance Shaders)."""
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def resolve_device(device: str) -> torch.device:
    """Turn 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' into a device that exists on this machine;
    'auto' is CUDA, else an Apple GPU, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "mps":
        if not mps_available():
            raise ModelError("device 'mps' was requested but no Apple GPU is available to torch (it needs macOS 12.3+ on Apple silicon): use --device cpu")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ModelError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was requested but CUDA is not available: use --device cpu")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ModelError(
            f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device(device)


# `--dtype int8`: int8 weights (kvcli/models/weights.py) under a model that computes in bfloat16.
INT8 = "int8"


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """The dtype the model computes in (its activations and KV cache): 'auto' is bfloat16 with int8
    weights (`resolve_weights`) on a CPU with bfloat16 instructions, float32 on other CPUs, bf16
    on CUDA (fp16 where the GPU has no bf16), fp16 on an Apple GPU; `int8` computes in bfloat16."""
    device = torch.device(device)
    if dtype == "auto" and resolve_weights(dtype, device) == INT8:
        return torch.bfloat16
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype == INT8:
        if device.type != "cpu":
            raise ModelError(f"--dtype int8 is for CPUs (its kernels are torch's CPU ones): use --dtype auto on {device.type}")
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use auto, int8, {', '.join(_DTYPES)}")
    if device.type == "mps" and dtype == "bfloat16":
        # torch's bf16 on Apple GPUs depends on the macOS release and misses kernels; fp16 is the supported half type
        raise ModelError("--dtype bfloat16 is not supported on an Apple GPU (mps): use --dtype float16 or float32")
    return _DTYPES[dtype]


def precision_name(dtype: torch.dtype, weights: str | None) -> str:
    """How reports and speed records name a model's numbers: 'float32', or 'int8 weights, bfloat16'."""
    name = str(dtype).removeprefix("torch.")
    return name if weights is None else f"{weights} weights, {name}"


def resolve_precision(dtype: str, device: torch.device | str, device_map=None) -> tuple[torch.dtype, str | None]:
    """(the compute dtype, how the weights are stored: 'int8' or None) for `--dtype` on `device`.
    A device map places float weights (accelerate moves them between devices and disk): `int8`
    is refused with one, and `auto` on a CPU is float32 there, as before int8 weights."""
    if device_map is not None:
        if dtype == INT8:
            raise ModelError("--dtype int8 cannot be combined with --device-map (the map places float weights): use --dtype auto")
        if dtype == "auto" and torch.device(device).type == "cpu":
            return torch.float32, None
        return resolve_dtype(dtype, device), None
    return resolve_dtype(dtype, device), resolve_weights(dtype, device)


def resolve_weights(dtype: str, device: torch.device | str) -> str | None:
    """How the weights are stored when not in the compute dtype: 'int8' for `--dtype int8`, and
    for 'auto' on a CPU with bfloat16 instructions, where int8 weights decode and prefill faster
    than float32 ones in a third of the memory (docs/results.md, "Weights on CPU"); None otherwise."""
    from .weights import cpu_has_bf16

    if dtype == INT8 or (dtype == "auto" and torch.device(device).type == "cpu" and cpu_has_bf16()):
        return INT8
    return None


def default_attn_implementation(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Attention kernel to use when the caller does not choose one."""
    device = torch.device(device)
    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    # flash-attn only runs fp16/bf16 on CUDA; everywhere else sdpa is the fastest built-in kernel.
    if device.type == "cuda" and half and find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_device_map(device_map: str | dict | None, device: str) -> str | dict | None:
    """Check `--device-map` (an accelerate strategy, or a dict from module names to devices in
    the Python API) against `--device`: a map places the model itself, so `--device` must be
    left at auto (or name CUDA, which the map fills first). None: the whole model on `device`."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        return device_map
    if device_map not in DEVICE_MAPS:
        raise ModelError(f"unknown --device-map '{device_map}': use {', '.join(DEVICE_MAPS)}")
    if device not in ("auto", "cuda"):
        raise ModelError(f"--device-map {device_map} places the model over the GPUs, the CPU and disk itself: leave --device at auto (not '{device}')")
    if find_spec("accelerate") is None:
        raise ModelError("--device-map needs accelerate: pip install accelerate")
    return device_map


def execution_device(model: torch.nn.Module) -> torch.device:
    """Where a model's input ids go: the device its input embedding computes on (under a device
    map, the execution device of accelerate's hook; an offloaded embedding's weight sits on `meta`)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return embedding.weight.device


def placement(model: torch.nn.Module) -> dict[str, int]:
    """How many decoder layers each device of a device map holds, e.g. {'cuda:0': 20, 'cpu': 8,
    'disk': 4}; empty when the model was not split."""
    hf_map = getattr(model, "hf_device_map", None) or {}
    counts: dict[str, int] = {}
    for name, where in hf_map.items():
        if re.search(r"\.layers?\.\d+$|\.h\.\d+$|\.blocks?\.\d+$", name):
            label = f"cuda:{where}" if isinstance(where, int) else str(where)
            counts[label] = counts.get(label, 0) + 1
    return counts


# Share of each GPU's memory a device map leaves free for the KV cache and the activations
# (a 128K-token prefill's activations alone are gigabytes on an 8B model): accelerate would
# otherwise fill every GPU with weights.
GPU_RESERVE = 0.2


def placement_kwargs(device_map: str | dict | None) -> dict:
    """What `from_pretrained` takes to split a model by `device_map`: the map, the memory each
    GPU may give the weights (GPU_RESERVE of it kept free) and a folder for what goes to disk,
    removed when the process ends. Empty without a map."""
    if device_map is None:
        return {}
    import atexit
    import shutil
    import tempfile

    from .checkpoints import home_folder

    folder = tempfile.mkdtemp(prefix="weights.", dir=home_folder("offload"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    kwargs: dict = {"device_map": device_map, "offload_folder": folder}
    if isinstance(device_map, str) and torch.cuda.is_available():
        kwargs["max_memory"] = max_memory()
    return kwargs


def max_memory() -> dict:
    """accelerate's `max_memory` for a device map: each GPU's free memory less GPU_RESERVE of its
    total, and the CPU's available memory (less 10%); what does not fit goes to disk."""
    memory: dict = {}
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        memory[index] = max(0, int(free - GPU_RESERVE * total))
    try:
        import psutil

        memory["cpu"] = int(psutil.virtual_memory().available * 0.9)
    except ImportError:
        pass
    return memory


def fingerprint(model: torch.nn.Module) -> str:
    """`identity.weights_fingerprint`, also for a model whose device map offloaded some layers
    (their weights wait on `meta` until a forward): only the few modules it reads (the
    embedding, the first and last decoder layers, the last weight's module) are brought in."""
    from .identity import weights_fingerprint

    named = [(name, param) for name, param in model.named_parameters() if param.ndim >= 1]
    if not any(param.device.type == "meta" for _, param in named):
        return weights_fingerprint(model)
    import contextlib

    from accelerate.utils import align_module_device, has_offloaded_params

    numbered = [(int(match.group(1)), name) for name, _ in named if (match := re.search(r"\.(\d+)\.", name))]
    edges = {min(i for i, _ in numbered), max(i for i, _ in numbered)} if numbered else set()
    wanted = {named[-1][0]} | {name for i, name in numbered if i in edges}
    modules = dict(model.named_modules())
    owners = []
    for name in wanted:
        path = name.rpartition(".")[0]
        while path and not has_offloaded_params(modules[path]):  # the module that holds the offloaded weight
            path = path.rpartition(".")[0]
        if path and modules[path] not in owners:
            owners.append(modules[path])
    embedding = model.get_input_embeddings()
    if has_offloaded_params(embedding):
        owners.append(embedding)
    with contextlib.ExitStack() as stack:
        for module in owners:
            stack.enter_context(align_module_device(module, torch.device("cpu")))
        return weights_fingerprint(model)
