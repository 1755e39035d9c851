"""kvcli on CUDA and on models split over devices: the same cache as the replayed capture, compression on each layer's device,
flash-attn against SDPA, device maps through load_model, GGUFs converted in bf16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import dispatch_model

from kvcli.attention import attend
from kvcli.generate import capture, decode, prefill
from kvcli.methods import REGISTRY, plan_budget
from kvcli.methods.base import Compressor
from methodutil import assert_same_cache, build, squeeze, tiny_llama

NUM_LAYERS = 6
PROMPT_LEN = 80
RATIO = 0.25
COMPRESSING = [name for name, cls in REGISTRY.items() if cls.compresses]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")


def prompt_ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def plan_for(method):
    return plan_budget(PROMPT_LEN, NUM_LAYERS, window_size=method.window_size, ratio=RATIO)


def layer_devices(model) -> list[torch.device]:
    """The device each decoder layer computes on (its hook's execution device under a device_map)."""
    devices = []
    for layer in model.model.layers:
        hook = getattr(layer, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        devices.append(torch.device(device) if device is not None else next(layer.parameters()).device)
    return devices


def assert_cache_on_layer_devices(cache, devices: list[torch.device]) -> None:
    for idx, (layer, device) in enumerate(zip(cache.layers, devices)):
        keys, values = layer.view()
        for name, tensor in (("keys", keys), ("values", values), ("positions", layer.kept_positions())):
            assert tensor.device.type == device.type and (tensor.device.index or 0) == (device.index or 0), f"layer {idx} {name} on {tensor.device}, expected {device}"


@pytest.fixture
def no_implicit_devices(monkeypatch):
    """Run every compression step with `meta` as the default device.

    A tensor the compression creates without naming a device then lands on `meta`, and the
    first operation mixing it with the layer's real tensors fails: every tensor must follow
    `key.device`/`positions.device`.
    """
    observe_live = Compressor.observe_live

    def on_meta(self, *args, **kwargs):
        with torch.device("meta"):
            return observe_live(self, *args, **kwargs)

    monkeypatch.setattr(Compressor, "observe_live", on_meta)


@pytest.mark.parametrize("name", COMPRESSING)
def test_split_device_map_keeps_compression_on_each_layers_device(tmp_path, no_implicit_devices, name):
    """A model split by an accelerate device_map (layers 0-2 in memory, 3-5 offloaded to disk) compresses as the unsplit model does, with every kept tensor on its layer's device and no tensor created on the default device."""
    reference = tiny_llama(NUM_LAYERS)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        **{f"model.layers.{i}": "cpu" if i < NUM_LAYERS // 2 else "disk" for i in range(NUM_LAYERS)},
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    split = dispatch_model(copy.deepcopy(reference), device_map=device_map, offload_dir=str(tmp_path))
    assert hasattr(split.model.layers[-1], "_hf_hook"), "the offloaded layers should run through accelerate's hooks"
    method = build(name, NUM_LAYERS, reference.config.num_attention_heads)
    plan = plan_for(method)
    ids = prompt_ids()
    got = prefill(split, ids, squeeze(method, plan))
    want = prefill(reference, ids, squeeze(method, plan))
    assert_cache_on_layer_devices(got.cache, layer_devices(split))
    assert sum(got.cache.retained_per_layer()) == plan.total
    assert_same_cache(got.cache, want.cache)
    assert list(decode(split, got, 6, set())) == list(decode(reference, want, 6, set()))


@pytest.mark.parametrize("name", ["snapkv", "evidencekv"])
def test_the_profile_split_creates_no_tensor_on_the_default_device(no_implicit_devices, name):
    """head_split=profile sizes heads without a tensor on the default device (here meta): the budget's entries are
    kept over heads of unequal lengths, on the layers' device."""
    model = tiny_llama(NUM_LAYERS)
    method = build(name, NUM_LAYERS, model.config.num_attention_heads, head_split="profile")
    plan = plan_for(method)
    state = prefill(model, prompt_ids(), squeeze(method, plan))
    lengths = state.cache.head_lengths()
    assert sum(map(sum, lengths)) == plan.total * len(lengths[0]) and len({n for layer in lengths for n in layer}) > 1
    assert all(p.device.type == "cpu" for layer in state.cache.layers for p in layer.head_positions())


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", list(REGISTRY))
def test_live_prefill_equals_replayed_capture_on_cuda(name):
    """On CUDA in bf16, compressing live during prefill keeps the same positions, keys and values as Capture.derive, and decodes the same tokens."""
    model = tiny_llama(NUM_LAYERS).to("cuda", torch.bfloat16)
    ids = prompt_ids().cuda()
    window = max(cls().window_size for cls in REGISTRY.values())
    captured = capture(model, ids, window, accumulated=True)
    method = build(name, NUM_LAYERS, model.config.num_attention_heads)
    plan = plan_for(method)
    live = prefill(model, ids, squeeze(method, plan))
    derived = captured.derive(squeeze(method, plan))
    assert_cache_on_layer_devices(live.cache, [torch.device("cuda", torch.cuda.current_device())] * NUM_LAYERS)
    assert_same_cache(live.cache, derived.cache)
    if method.compresses:
        assert sum(live.cache.retained_per_layer()) == plan.total
    assert torch.allclose(live.logits.float(), derived.logits.float(), atol=1e-3)
    assert list(decode(model, live, 8, set())) == list(decode(model, derived, 8, set()))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("q_len", [2048, 1], ids=["prefill", "decode"])
def test_attention_runs_on_fused_kernels(q_len):
    """kvcli's prefill and decode attention run with the math SDPA kernel disabled (no q_len x k_len matrix is built) and match repeated-KV attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    k_len, num_heads, num_kv_heads, head_dim = 2048, 32, 8, 128
    query = torch.randn(1, num_heads, q_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    key = torch.randn(1, num_kv_heads, k_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    value = torch.randn(1, num_kv_heads, k_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    scaling = head_dim**-0.5
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = attend(query, key, value, scaling)  # (1, q_len, num_heads, head_dim)
    group = num_heads // num_kv_heads
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device="cuda").tril(k_len - q_len)
    expected = F.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1), attn_mask=mask, scale=scaling
    ).transpose(1, 2)
    assert out.shape == (1, q_len, num_heads, head_dim)
    assert torch.allclose(out.float(), expected, atol=2e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", COMPRESSING)
def test_cpu_cuda_split_compresses_on_each_layers_device(name):
    """A model whose first layers are on CUDA and last on the CPU compresses to the budget, keeps each layer's cache on its device, and decodes."""
    model = tiny_llama(NUM_LAYERS)
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        **{f"model.layers.{i}": 0 if i < NUM_LAYERS // 2 else "cpu" for i in range(NUM_LAYERS)},
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    split = dispatch_model(model, device_map=device_map)
    method = build(name, NUM_LAYERS, model.config.num_attention_heads)
    plan = plan_for(method)
    state = prefill(split, prompt_ids().cuda(), squeeze(method, plan))
    devices = layer_devices(split)
    assert {d.type for d in devices} == {"cuda", "cpu"}
    assert_cache_on_layer_devices(state.cache, devices)
    assert sum(state.cache.retained_per_layer()) == plan.total
    assert len(list(decode(split, state, 6, set()))) == 6
    assert_cache_on_layer_devices(state.cache, devices)


def flash_ready() -> bool:
    from kvcli import flash

    return torch.cuda.is_available() and flash.installed() is None


needs_flash = pytest.mark.skipif(not flash_ready(), reason="needs a CUDA device and flash-attn 2.6+")


@pytest.mark.cuda
@needs_flash
@pytest.mark.parametrize("q_len, k_len, window, softcap", [
    (2048, 2048, None, None), (512, 4096, None, None), (1, 4096, None, None), (1024, 1024, 256, None), (1, 2048, 512, None), (256, 2048, None, 30.0),
], ids=["prefill", "chunk", "decode", "sliding-prefill", "sliding-decode", "softcap"])
def test_flash_attn_matches_sdpa_on_cuda(q_len, k_len, window, softcap):
    """kvcli.flash.attend (flash-attn) returns what kvcli's SDPA attention returns, in bf16, for prefill, a chunk after a cache, decoding, sliding windows and softcapping."""
    from kvcli import flash
    from kvcli.attention import LayerAttention

    gen = torch.Generator(device="cuda").manual_seed(0)
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    query = torch.randn(1, num_heads, q_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    key = torch.randn(1, num_kv_heads, k_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    value = torch.randn(1, num_kv_heads, k_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    attn = LayerAttention(scaling=head_dim**-0.5, sliding_window=window, softcap=softcap)
    assert flash.why_not(query, key, value, attn) is None
    got = flash.attend(query, key, value, attn)
    with flash.use_flash(False):
        want = attend(query, key, value, attn)
    assert got.shape == want.shape == (1, q_len, num_heads, head_dim)
    assert torch.allclose(got.float(), want.float(), atol=2e-2), (got.float() - want.float()).abs().max()


@pytest.mark.cuda
@needs_cuda
def test_load_model_with_a_device_map_splits_over_cuda_and_the_cpu(tmp_path, monkeypatch):
    """load_model with a device map (half the layers on CUDA, half on the CPU) reports the split, reads and decodes, and keeps each layer's cache on its layer's device."""
    from test_models import save_tiny_llama

    from kvcli.models import load_model

    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    folder = save_tiny_llama(tmp_path / "tiny")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    lm = load_model(str(folder), device_map=device_map)
    assert lm.placement == {"cuda:0": 1, "cpu": 1} and lm.device.type == "cuda"
    ids = torch.randint(3, 60, (1, 64), generator=torch.Generator().manual_seed(0)).to(lm.device)
    method = build("snapkv", 2, 4)
    plan = plan_budget(64, 2, window_size=method.window_size, ratio=0.25)
    state = prefill(lm.model, ids, squeeze(method, plan))
    assert_cache_on_layer_devices(state.cache, layer_devices(lm.model))
    assert len(list(decode(lm.model, state, 4, set()))) == 4


@pytest.mark.cuda
@needs_cuda
def test_a_gguf_loaded_on_cuda_is_converted_in_bfloat16(tmp_path, monkeypatch):
    """On CUDA the embedded SmolLM2 GGUF is converted into a bfloat16 checkpoint (half the disk of float32) and runs in bfloat16."""
    from kvcli.errors import ModelError
    from kvcli.models import EMBEDDED, load_model

    try:
        EMBEDDED["smollm2-135m"].part_paths()
    except ModelError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    lm = load_model("smollm2-135m", device="cuda")
    assert lm.dtype is torch.bfloat16 and lm.converted
    folders = [p.name for p in (tmp_path / "home" / "models").iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].endswith("-bfloat16")


# --- unequal heads and the question-agnostic default on CUDA (issue 26) --------------------------------
# Each runs on the CPU too, so the test itself is checked on every machine; on CUDA it is what the
# device check (scripts/gpu_check.sh) runs first.

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("use_flash", [True, False])
def test_a_packed_layer_attends_as_its_heads_padded_and_masked(device, q_len, use_flash):
    """A packed layer in bfloat16 (KV heads of 6 and 23 entries, the newest q_len last in both) attends, through
    what a model's layer calls (`attend_packed`: flash-attn or SDPA per KV head on CUDA, kvcli's kernel or SDPA on the
    CPU), as the same entries padded to the longest head and masked, computed in float64."""
    from test_heads import padded_reference

    from kvcli import flash
    from kvcli.attention import LayerAttention, attend_packed
    from kvcli.cache import KVLayer

    gen = torch.Generator().manual_seed(3)
    n, head_dim = 40, 64
    keys, values = (torch.randn(1, 2, n, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    layer = KVLayer()
    layer.append(keys, values, torch.arange(n))
    newest = list(range(n - q_len, n))
    layer.keep_positions([torch.tensor([0, 5, 9, 17, 30][: 6 - q_len] + newest), torch.tensor(list(range(23 - q_len)) + newest)])
    assert layer.packed and layer.head_lengths() == [6, 23]
    query = torch.randn(1, 8, q_len, head_dim, generator=gen).to(device, torch.bfloat16)
    attn = LayerAttention(scaling=head_dim**-0.5)
    with flash.use_flash(use_flash):
        out = attend_packed(query, layer, attn)
    heads = [(k.cpu(), v.cpu()) for k, v in layer.head_views()]
    assert out.shape == (1, q_len, 8, head_dim) and out.device.type == device
    torch.testing.assert_close(out.cpu().double(), padded_reference(query.cpu(), heads, attn), atol=3e-2, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_the_question_agnostic_default_reads_and_answers_on_the_device(tmp_path, device):
    """`compress`'s default (dynamickv, adaptive split, rescore=2, surprisal=0.35) on a model on `device`: the repeat,
    the surprisal (its output layer read in slices), both repeats and the packed layers run there, keep exactly the
    budget with heads of unequal lengths, and the answer decodes."""
    from test_models import save_tiny_llama
    from test_repeat import words

    from kvcli.defaults import AGNOSTIC_METHOD, AGNOSTIC_PARAMS
    from kvcli.methods import Budget, configure
    from kvcli.models import load_model
    from kvcli.reading import Options, Reader, Reused, answer

    folder = save_tiny_llama(tmp_path / "tiny", max_positions=1024)
    reader = Reader(load_model(str(folder), device=device, dtype="bfloat16" if device == "cuda" else "float32"))
    method = configure([AGNOSTIC_METHOD], list(AGNOSTIC_PARAMS), None)[0]
    options = Options(budget=Budget(ratio=0.15), max_new_tokens=4)
    prefix = Reused(reader, words(300), options, scorer="repeat").read(method)
    cache = prefix.state.cache
    compression = prefix.state.compression
    assert sum(cache.retained_per_layer()) == compression.plan.total
    assert any(layer.packed for layer in cache.layers)
    assert prefix.extra["repeats"] == 2 and prefix.extra["surprisal"] == 0.35 and "surprisal_s" in prefix.extra
    assert all(k.device.type == device for layer in cache.layers for k, _ in layer.head_views())
    result = answer(reader, prefix.ask(reader, "w3 w4?", options), options)
    assert len(result.tokens) >= 1
