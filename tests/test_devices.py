"""Where a model runs, on the CPU: Apple GPUs (mps) chosen and placed, models split by a device
map, GGUFs converted to the dtype they run in, hub downloads with progress and one-line refusals,
and the CPU thread settings (`--threads`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import embedded_parts
from safetensors import safe_open
from test_cli_tiny import one_line_error
from test_models import save_tiny_llama
from typer.testing import CliRunner

import kvcli.models.checkpoints
import kvcli.models.device
import kvcli.models.hub
from kvcli import threads
from kvcli.cli import app
from kvcli.errors import InputError, ModelError
from kvcli.generate import decode, prefill
from kvcli.methods import make_method
from kvcli.models import load_model, resolve_device, resolve_dtype
from kvcli.models.checkpoints import embedded_target, gguf_checkpoint
from kvcli.models.device import resolve_device_map
from kvcli.models.embedded import EMBEDDED

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024)


# --- Apple GPUs ------------------------------------------------------------------------------


def test_mps_is_a_device_and_auto_picks_it_without_cuda(monkeypatch):
    """--device mps resolves to the mps device where torch has one, and auto picks it when there is no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kvcli.models.device, "mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(kvcli.models.device, "mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_mps_without_an_apple_gpu_is_one_line(monkeypatch):
    """Asking for mps where torch has no Apple GPU is a one-line ModelError pointing at --device cpu."""
    monkeypatch.setattr(kvcli.models.device, "mps_available", lambda: False)
    with pytest.raises(ModelError, match="no Apple GPU") as info:
        resolve_device("mps")
    assert "--device cpu" in str(info.value) and "\n" not in str(info.value)


def test_mps_runs_float16_by_default_and_refuses_bfloat16():
    """On mps, auto is float16, float32 is allowed, and bfloat16 is refused with the supported choices."""
    mps = torch.device("mps")
    assert resolve_dtype("auto", mps) is torch.float16
    assert resolve_dtype("float32", mps) is torch.float32
    with pytest.raises(ModelError, match="float16 or float32"):
        resolve_dtype("bfloat16", mps)


def test_a_model_loaded_for_mps_is_moved_there_in_float16(tiny, home, monkeypatch):
    """load_model(device='mps') loads in float16 and moves the model to the mps device (the move is recorded here: no Apple GPU on this machine)."""
    monkeypatch.setattr(kvcli.models.device, "mps_available", lambda: True)
    moved = []

    def record_to(self, *args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return self

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "to", record_to)
    lm = load_model(str(tiny), device="mps")
    assert moved == [torch.device("mps")]
    assert lm.device == torch.device("mps") and lm.dtype is torch.float16
    assert next(lm.model.parameters()).dtype is torch.float16


def test_cli_device_mps_without_one_is_a_one_line_error(tiny, home, tmp_path, monkeypatch):
    """`kvcli ask --device mps` on a machine without an Apple GPU exits 2 with one line."""
    monkeypatch.setattr(kvcli.models.device, "mps_available", lambda: False)
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3")
    one_line_error(runner.invoke(app, ["ask", str(doc), "w1?", "-m", str(tiny), "--device", "mps"]), "mps", "--device cpu")


# --- device maps -----------------------------------------------------------------------------


def split_map(num_layers: int) -> dict:
    return {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        **{f"model.layers.{i}": "cpu" if i < num_layers // 2 else "disk" for i in range(num_layers)},
        "model.norm": "cpu",
        "lm_head": "cpu",
    }


def test_a_device_map_with_disk_offload_reads_and_decodes_as_the_whole_model(tiny, home):
    """A model loaded with half its layers offloaded to disk says where its layers are, keeps the
    same weights fingerprint, and prefills and decodes exactly as the model loaded whole."""
    split = load_model(str(tiny), device_map=split_map(2))
    whole = load_model(str(tiny))
    assert split.placement == {"cpu": 1, "disk": 1} and whole.placement == {}
    assert any(p.device.type == "meta" for p in split.model.parameters())  # really offloaded
    assert split.weights_fingerprint == whole.weights_fingerprint and split.device == torch.device("cpu")
    ids = torch.randint(3, 60, (1, 40), generator=torch.Generator().manual_seed(0))
    got, want = prefill(split.model, ids), prefill(whole.model, ids)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert list(decode(split.model, got, 6, set())) == list(decode(whole.model, want, 6, set()))


def test_device_map_auto_from_the_cli_answers_as_without(tiny, home, tmp_path):
    """`kvcli ask --device-map auto` (all on the CPU here) answers as the plain load does."""
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{(7 * i) % 60}" for i in range(300)))
    args = ["ask", str(doc), "w5?", "-m", str(tiny), "--max-new-tokens", "4", "--json", "--method", "snapkv"]
    plain = runner.invoke(app, args)
    mapped = runner.invoke(app, [*args, "--device-map", "auto"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.stderr
    assert json.loads(mapped.stdout)["answer"] == json.loads(plain.stdout)["answer"]


def test_device_map_choices_are_checked(home, tiny, tmp_path):
    """An unknown --device-map, or one with --device cpu, is a one-line error naming what to pass."""
    with pytest.raises(ModelError, match="auto, balanced"):
        resolve_device_map("everywhere", "auto")
    with pytest.raises(ModelError, match="leave --device at auto"):
        resolve_device_map("auto", "cpu")
    assert resolve_device_map("auto", "auto") == "auto" and resolve_device_map(None, "cpu") is None
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2")
    one_line_error(runner.invoke(app, ["ask", str(doc), "w1?", "-m", str(tiny), "--device-map", "sideways"]), "--device-map")


def test_the_gpu_reserve_leaves_room_for_the_cache(monkeypatch):
    """With CUDA, a device map may fill each GPU only up to its free memory less the reserve for the KV cache and activations."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (70 << 30, 80 << 30) if index == 0 else (10 << 30, 80 << 30))
    memory = kvcli.models.device.max_memory()
    assert memory[0] == (70 << 30) - int(0.2 * (80 << 30)) and memory[1] == 0
    assert memory.get("cpu", 1) > 0


# --- GGUF conversion dtype -------------------------------------------------------------------


def test_a_gguf_is_converted_in_the_dtype_it_will_run_in(tmp_path, home, monkeypatch, tiny):
    """A .gguf loaded in bfloat16 is converted once into a bfloat16 checkpoint of its own folder; float32 keeps the folder name it always had."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"x" * 100)
    calls = []

    def fake_convert(path, out_dir, dtype=torch.float32):
        calls.append(dtype)
        import shutil

        shutil.copytree(tiny, out_dir)

    monkeypatch.setattr(kvcli.models.checkpoints, "convert_gguf", fake_convert)
    bf16, _ = gguf_checkpoint(gguf, lambda message: None, torch.bfloat16)
    fp32, _ = gguf_checkpoint(gguf, lambda message: None)
    assert calls == [torch.bfloat16, torch.float32]
    assert bf16.name.endswith("-bfloat16") and bf16.name == fp32.name + "-bfloat16"
    assert json.loads((bf16 / "kvcli.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((fp32 / "kvcli.json").read_text())["dtype"] == "float32"
    lm = load_model(str(gguf), dtype="bfloat16")  # reuses the bfloat16 conversion
    assert calls == [torch.bfloat16, torch.float32] and lm.dtype is torch.bfloat16
    embedded = EMBEDDED["smollm2-135m"]
    assert embedded_target(embedded, home).name == f"smollm2-135m-{embedded.sha256[:12]}"


@pytest.mark.model
def test_converting_a_real_gguf_to_bfloat16_halves_its_weights(tmp_path):
    """The embedded SmolLM2 GGUF converted for a bfloat16 run holds bfloat16 weights, about half the bytes of its float32 conversion."""
    from kvcli.models.convert import convert_gguf

    parts = embedded_parts("smollm2-135m")
    gguf = tmp_path / "smollm2.gguf"
    gguf.write_bytes(b"".join(part.read_bytes() for part in parts))
    sizes = {}
    for dtype in (torch.bfloat16, torch.float32):
        out = tmp_path / str(dtype)
        convert_gguf(gguf, out, dtype)
        files = sorted(out.glob("*.safetensors"))
        with safe_open(str(files[0]), "pt") as weights:
            name = next(iter(weights.keys()))
            assert weights.get_tensor(name).dtype is dtype
        sizes[dtype] = sum(f.stat().st_size for f in files)
    assert 0.45 < sizes[torch.bfloat16] / sizes[torch.float32] < 0.55


# --- the hub ---------------------------------------------------------------------------------


class FakeSibling:
    def __init__(self, name: str, size: int) -> None:
        self.rfilename, self.size = name, size


def test_repository_files_fetched_are_the_ones_a_load_reads():
    """Top-level configs, tokenizer files and safetensors weights are fetched; .bin copies, folders and code (unless trusted) are not."""
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "original/consolidated.00.pth",
             "modeling_x.py", "README.md", "chat_template.jinja", "onnx/model.onnx"]
    fetched = kvcli.models.hub.files_to_fetch(names)
    assert fetched == sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"])
    assert "modeling_x.py" in kvcli.models.hub.files_to_fetch(names, trust_remote_code=True)
    assert kvcli.models.hub.files_to_fetch(["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]


def test_a_download_reports_its_progress(monkeypatch):
    """Fetching a hub model reports the bytes of the whole model on the status line, file by file."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(kvcli.models.hub, "is_cached", lambda spec: False)
    monkeypatch.setattr(kvcli.models.hub, "_REPORT_EVERY_S", 0.0)

    class Api:
        def model_info(self, spec, files_metadata):
            return type("Info", (), {"siblings": [FakeSibling("config.json", 1 << 20), FakeSibling("model.safetensors", 3 << 30)]})()

    def download(spec, name, tqdm_class):
        size = (1 << 20) if name == "config.json" else (3 << 30)
        with tqdm_class(total=size, unit="B") as bar:
            bar.update(size // 2)
            bar.update(size - size // 2)
        return f"/cache/{name}"

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    messages = []
    kvcli.models.hub.fetch("org/model", messages.append)
    assert messages[0] == "downloading org/model: 0.00 of 3.00 GiB (file 1 of 2)"
    assert "downloading org/model: 1.50 of 3.00 GiB (file 2 of 2)" in messages
    assert messages[-1] == "downloading org/model: 3.00 of 3.00 GiB (file 2 of 2)"


def hub_failure(kind: str):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = httpx2.Response(401 if kind != "server" else 503, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/model"))
    if kind == "gated":
        return GatedRepoError("Access to model org/model is restricted", response=response)
    if kind == "missing":
        return RepositoryNotFoundError("Repository Not Found", response=response)
    return ConnectionError("Network is unreachable")


@pytest.mark.parametrize("kind, words", [
    ("gated", ["gated", "https://huggingface.co/org/model", "hf auth login", "HF_TOKEN"]),
    ("missing", ["not found", "needs a login", "HF_TOKEN"]),
    ("offline", ["cannot download", "hf download org/model", "local folder"]),
])
def test_hub_refusals_are_one_line_with_the_fix(home, monkeypatch, kind, words):
    """A gated model says to accept its terms and log in or set HF_TOKEN; a missing one (a 401) names the login; an unreachable hub says how to pre-download; each in one line."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(kvcli.models.hub, "is_cached", lambda spec: False)

    class Api:
        def model_info(self, spec, files_metadata):
            raise hub_failure(kind)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(ModelError) as info:
        load_model("org/model")
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_cached_or_offline_hub_model_is_not_fetched(monkeypatch):
    """Nothing is asked of the hub for a model already in the cache, or with HF_HUB_OFFLINE set."""
    import huggingface_hub

    class Api:
        def model_info(self, spec, files_metadata):
            raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(kvcli.models.hub, "is_cached", lambda spec: True)
    kvcli.models.hub.fetch("org/model", lambda message: None)
    monkeypatch.setattr(kvcli.models.hub, "is_cached", lambda spec: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    kvcli.models.hub.fetch("org/model", lambda message: None)


# --- CPU threads -----------------------------------------------------------------------------


def test_auto_threads_count_the_free_cores_and_decode_on_at_most_half():
    """auto prefills on the cores other processes leave free and decodes on at most half the machine's cores, never fewer than one."""
    assert (threads.plan_threads("auto", cores=2, busy=0).prefill, threads.plan_threads("auto", cores=2, busy=0).decode) == (2, 1)
    assert (threads.plan_threads("auto", cores=2, busy=2).prefill, threads.plan_threads("auto", cores=2, busy=2).decode) == (1, 1)
    assert (threads.plan_threads("auto", cores=16, busy=0).prefill, threads.plan_threads("auto", cores=16, busy=0).decode) == (16, 8)
    assert (threads.plan_threads("auto", cores=16, busy=12).prefill, threads.plan_threads("auto", cores=16, busy=12).decode) == (4, 4)
    assert threads.plan_threads("3", cores=16, busy=12) == threads.ThreadPlan(3, 3, "--threads 3")


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_threads_are_an_input_error(value):
    """--threads takes auto or a positive count; anything else is an InputError."""
    with pytest.raises(InputError, match="--threads must be auto or a positive number"):
        threads.parse_threads(value)


def test_decoding_uses_the_plans_decode_threads_then_restores():
    """Inside decoding() torch runs the plan's decode threads; after it, the prefill's; without a plan nothing changes."""
    outside = torch.get_num_threads()
    with threads.kept():
        before = torch.get_num_threads()
        with threads.decoding(None):
            assert torch.get_num_threads() == before
        torch.set_num_threads(2)
        with threads.decoding(threads.ThreadPlan(prefill=2, decode=1, why="test")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == outside


def test_decode_runs_inside_the_decode_threads(tiny, home):
    """A reader's answers decode on its thread plan's decode threads (the CLI's --threads), whatever prefill used;
    the plan is the reader's, not the process's: another reader over the same model leaves torch's threads alone."""
    from kvcli.reading import Options, QueryAware, Reader, answer

    lm = load_model(str(tiny))
    seen = []
    original = lm.model.forward

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    options = Options(max_new_tokens=4)
    with threads.kept():
        torch.set_num_threads(2)
        reader = Reader(lm, threads=threads.ThreadPlan(prefill=2, decode=1, why="test"))
        reading = QueryAware(reader, "w1 w2 w3 w4 w5 w6", options).read("w7?", make_method("full"))
        lm.model.forward = spy
        try:
            assert len(answer(reader, reading, options).tokens) == 4
            assert seen and set(seen) == {1}
            seen.clear()
            plain = Reader(lm)
            answer(plain, QueryAware(plain, "w1 w2 w3 w4 w5 w6", options).read("w7?", make_method("full")), options)
            assert seen and set(seen) == {2}
        finally:
            lm.model.forward = original


def test_auto_prefill_counts_the_free_cores_again_as_it_starts(tiny, home, monkeypatch):
    """Under auto, a prefill runs on the cores free when it starts (a neighbour that started after the command
    costs it a thread), and torch's count is put back after; a fixed --threads plan keeps its count."""
    from kvcli.reading import Options, QueryAware, Reader

    lm = load_model(str(tiny))
    Reader(lm)  # the model's one-time probe runs before any prefill
    seen = []
    original = lm.model.forward

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    options = Options(max_new_tokens=1)
    with threads.kept():
        torch.set_num_threads(2)
        plan = threads.plan_threads("auto", cores=2, busy=0)  # the machine was free when the command started
        reader = Reader(lm, threads=plan)
        monkeypatch.setattr(threads, "busy_elsewhere", lambda *a, **k: 1.0)  # then a neighbour took a core
        lm.model.forward = spy
        try:
            QueryAware(reader, "w1 w2 w3 w4 w5 w6", options).read("w7?", make_method("full"))
            assert seen == [1] and plan.last_prefill == 1 and torch.get_num_threads() == 2
            seen.clear()
            torch.set_num_threads(1)
            reader = Reader(lm, threads=threads.plan_threads("2"))
            QueryAware(reader, "w1 w2 w3 w4 w5 w6", options).read("w7?", make_method("full"))
            assert seen == [2]
        finally:
            lm.model.forward = original


def test_cli_threads_are_checked_and_scoped_to_the_command(tiny, home, tmp_path):
    """`--threads 0` is a one-line error; `--threads 1` answers and leaves the process's thread count as it was."""
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{i % 60}" for i in range(100)))
    one_line_error(runner.invoke(app, ["ask", str(doc), "w1?", "-m", str(tiny), "--threads", "0"]), "--threads")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = runner.invoke(app, ["ask", str(doc), "w1?", "-m", str(tiny), "--threads", "1", "--max-new-tokens", "2", "--json"])
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_elsewhere_reads_the_machine_or_says_it_cannot():
    """busy_elsewhere is a non-negative count of cores taken by other processes on Linux, or None where the system does not say."""
    busy = threads.busy_elsewhere(samples=2, interval_s=0.0)
    assert busy is None or 0 <= busy <= 4096
