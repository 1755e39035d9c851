"""Bring your own model: 19 architectures, as tiny random models built in the test, read exactly or refused clearly.

For each: `--method full` decodes `model.generate`'s greedy tokens and its first-token logits
are the model's own (eager) attention's; every compressing method keeps exactly its budget on
the global layers; a sliding-window layer keeps at most its window, the latest tokens; a model
whose attention bypasses kvcli's function runs with the full cache only. docs/models.md is the
table of what each does.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from methodutil import squeeze
from typer.testing import CliRunner

from kvcli.attention import LayerAttention, ModelAttention, UnsupportedAttention, read_layer_attention
from kvcli.cli import app
from kvcli.generate import ask_after, capture, decode, extend, forward, new_cache, prefill, prepare_model, read_prefix
from kvcli.methods import REGISTRY, Budget, make_method
from kvcli.reindex import Reindexer
from kvcli.repeat import _decoder_outputs, repeat_prefix, token_surprisal
from kvcli.rope import rotary_layout

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 12  # every sliding layer's window: well inside the prompt, so it bites
PROMPT_LEN = 48
NEW_TOKENS = 8
SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
         # larger weights than the default give varied greedy tokens with clear margins
         "initializer_range": 0.3}
MIXED = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _config(name: str, **fields):
    return getattr(transformers, name)(**{**SMALL, "num_hidden_layers": 4, **fields})


# The 19 architectures of issue #12 (docs/models.md has one row each).
ARCHITECTURES = {
    "llama": lambda: _config("LlamaConfig"),
    "qwen2": lambda: _config("Qwen2Config"),
    "qwen3": lambda: _config("Qwen3Config", head_dim=16),
    "qwen3-moe": lambda: _config("Qwen3MoeConfig", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mistral": lambda: _config("MistralConfig", sliding_window=None),
    "mistral-sliding": lambda: _config("MistralConfig", sliding_window=WINDOW),
    "phi3": lambda: _config("Phi3Config"),
    "granite": lambda: _config("GraniteConfig", attention_multiplier=0.2),
    "olmo": lambda: _config("OlmoConfig"),
    "olmo2": lambda: _config("Olmo2Config"),
    "smollm3": lambda: _config("SmolLM3Config", no_rope_layers=[1, 1, 1, 0]),
    "cohere": lambda: _config("CohereConfig"),
    "gpt-neox": lambda: _config("GPTNeoXConfig", rotary_pct=0.25),
    # a small cap, so that the softcapping changes the logits (tests below check that it does)
    "gemma2": lambda: _config("Gemma2Config", head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=0.3, query_pre_attn_scalar=16,
                                initializer_range=0.05),  # Gemma scales its embeddings up: larger weights repeat one token
    "gemma3": lambda: _config("Gemma3TextConfig", head_dim=16, sliding_window=WINDOW, layer_types=MIXED, initializer_range=0.02),
    "cohere2": lambda: _config("Cohere2Config", sliding_window=WINDOW, layer_types=MIXED),
    "gpt-oss": lambda: _config("GptOssConfig", head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 64, "rope_theta": 150000.0}),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, initializer_range=0.3),
    "stablelm": lambda: _config("StableLmConfig", partial_rotary_factor=0.25),
}
BYPASSED = {"falcon", "stablelm"}  # their attention never reaches kvcli's function
ALL_SLIDING = {"mistral-sliding"}  # every layer is a sliding-window layer: nothing to compress
COMPRESSIBLE = [name for name in ARCHITECTURES if name not in BYPASSED | ALL_SLIDING]
SLIDING = ["mistral-sliding", "gemma2", "gemma3", "cohere2", "gpt-oss"]
METHODS = [name for name, cls in REGISTRY.items() if cls.compresses]


def build(name: str, max_positions: int | None = None):
    """The architecture's tiny random model with its own (eager) attention, in eval mode."""
    config = ARCHITECTURES[name]()
    if max_positions is not None:
        config.max_position_embeddings = max_positions
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if name == "gpt-oss":
        with torch.no_grad():  # sinks of a size that matters (they start near zero)
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) * 2)
    return model


_MODELS: dict[str, tuple] = {}


def models(name: str):
    """(the model with its own attention, a copy prepared for kvcli), built once per test session."""
    if name not in _MODELS:
        reference = build(name)
        _MODELS[name] = (reference, copy.deepcopy(reference))
    return _MODELS[name]


def prompt(seed: int = 1, n: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def compression(model, name: str, ratio: float = 0.4):
    """What kvcli's reader compresses a PROMPT_LEN prompt with under `name` at `ratio`: the plan is over the global layers."""
    method = make_method(name)
    layout = prepare_model(model)
    plan, _ = Budget(ratio=ratio).plan(PROMPT_LEN, len(layout.compressed_layers), method.window_size)
    return squeeze(method, plan, model.config.num_attention_heads), plan


def assert_sliding_layers_hold_their_window(cache, upto: int) -> None:
    """Every sliding layer holds exactly the latest min(upto, window - 1) positions below `upto`, in order."""
    for layer in cache.layers:
        if layer.window is not None:
            n = min(upto, layer.window - 1)
            expected = torch.arange(upto - n, upto).expand(layer.kept_positions().shape[0], -1)
            assert torch.equal(layer.kept_positions(), expected)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_full_cache_is_the_models_own_attention(name):
    """With the full cache, the first-token logits are the model's own to 1e-5 and decoding gives model.generate's greedy tokens."""
    reference, model = models(name)
    ids = prompt()
    with torch.inference_mode():
        expected_logits = reference(ids).logits[0, -1]
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, PROMPT_LEN:].tolist()
    state = prefill(model, ids)
    torch.testing.assert_close(state.logits, expected_logits, atol=1e-5, rtol=0)
    assert list(decode(model, state, NEW_TOKENS, set())) == expected
    assert len(set(expected)) > 1, "the tiny model should not just repeat one token"
    assert_sliding_layers_hold_their_window(state.cache, PROMPT_LEN + NEW_TOKENS - 1)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_probe_finds_what_the_config_predicts(name):
    """The probe through kvcli's attention finds the sliding layers (and a bypassing attention) that the config predicts before loading."""
    reference, model = models(name)
    probed = prepare_model(model)
    predicted = ModelAttention.from_config(reference.config)
    assert (probed.windows, probed.bypassed) == (predicted.windows, predicted.bypassed)
    assert probed.bypassed == (name in BYPASSED)
    assert (WINDOW in probed.windows) == (name in SLIDING)
    assert bool(probed.cannot_compress()) == (name in BYPASSED | ALL_SLIDING)


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_every_method_keeps_its_budget_on_the_global_layers(name, method_name):
    """Every method keeps exactly the plan's total over the global layers; each sliding layer its latest window - 1 tokens; decoding goes on."""
    _, model = models(name)
    squeezed, plan = compression(model, method_name)
    state = prefill(model, prompt(), squeezed)
    cache = state.cache
    assert sum(cache.layers[i].length for i in cache.compressed_layers) == plan.total
    assert plan.num_layers == len(cache.compressed_layers) and plan.total < plan.num_layers * PROMPT_LEN
    assert_sliding_layers_hold_their_window(cache, PROMPT_LEN)
    assert len(list(decode(model, state, 4, set()))) == 4
    assert_sliding_layers_hold_their_window(cache, PROMPT_LEN + 3)


@pytest.mark.parametrize("name", SLIDING[1:])
def test_live_compression_equals_the_replayed_capture_with_sliding_layers(name):
    """With sliding layers, compressing live keeps the same entries per layer as deriving from one capture."""
    _, model = models(name)
    ids = prompt()
    captured = capture(model, ids, 8, accumulated=True)
    assert len(captured.observations) == len(captured.cache.compressed_layers)
    for method_name in ("snapkv", "dynamickv", "h2o"):
        squeezed, _ = compression(model, method_name)
        live, derived = prefill(model, ids, squeezed), captured.derive(squeezed)
        for a, b in zip(live.cache.layers, derived.cache.layers, strict=True):
            assert torch.equal(a.kept_positions(), b.kept_positions())


@pytest.mark.parametrize("name", [name for name in SLIDING if name not in ALL_SLIDING])
def test_chunked_prefill_keeps_the_window_and_the_budget(name):
    """Read in chunks with a probe, sliding layers hold the prompt's latest window (never the probe) and the global layers the budget."""
    _, model = models(name)
    squeezed, plan = compression(model, "snapkv")
    state = prefill(model, prompt(), squeezed, chunk_size=16, probe_ids=prompt(seed=9, n=5))
    assert len(state.chunks) == 3
    assert sum(state.cache.layers[i].length for i in state.cache.compressed_layers) == plan.total
    assert_sliding_layers_hold_their_window(state.cache, PROMPT_LEN)


@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_token_surprisal_is_each_architectures_own_next_token_loss(name):
    """The surprisal that weighs the repeat's scores (--param surprisal), taken from kvcli's own prefill through the
    decoder's last hidden states and the output layer, equals the cross-entropy of the model's own logits at every
    position (Gemma 2's and 3's logit softcapping, Gemma 3's wrapper, tied and untied heads)."""
    reference, model = models(name)
    ids = prompt()
    prepare_model(model)  # probed before the decoder is watched, as repeat_prefix does
    with _decoder_outputs(model) as seen:
        prefill(model, ids)
    surprisal = token_surprisal(model, ids, torch.cat(seen, dim=1))
    with torch.inference_mode():
        logits = reference(input_ids=ids, use_cache=False).logits[0].float()
    expected = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(surprisal[1:], expected, rtol=1e-4, atol=1e-4)


def test_the_repeat_scorer_scores_the_global_layers_only():
    """The repeat scorer (--scorer repeat) scores Gemma 2's global layers only; its derived cache meets the budget there and keeps each window."""
    _, model = models("gemma2")
    ids = prompt()
    repeated = repeat_prefix(model, ids, ids[:, 4:], lambda start: prompt(seed=5, n=3), chunk_size=16)
    assert [scores is None for scores in repeated.scores] == [True, False, True, False]
    squeezed, plan = compression(model, "snapkv")
    cache = repeated.derive(squeezed).cache
    assert sum(cache.layers[i].length for i in cache.compressed_layers) == plan.total
    assert_sliding_layers_hold_their_window(cache, PROMPT_LEN)
    # a second repeat over a cut of twice the budget (--param rescore=2) reads the sliding layers as the first did
    rescored = repeated.derive(replace(squeezed, method=replace(squeezed.method, rescore=2.0), plan=replace(plan, total=plan.total // 2))).cache
    assert sum(rescored.layers[i].length for i in rescored.compressed_layers) == plan.total // 2
    assert_sliding_layers_hold_their_window(rescored, PROMPT_LEN)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_tokens_fed_after_a_cache_see_what_one_pass_sees(name):
    """Feeding the prompt's last 10 tokens after a cache of the rest gives one pass's logits (sliding windows across the seam)."""
    _, model = models(name)
    ids = prompt()
    whole = prefill(model, ids)
    split = extend(model, prefill(model, ids[:, :-10]), ids[:, -10:])
    torch.testing.assert_close(split.logits, whole.logits, atol=1e-5, rtol=0)
    assert split.cache.retained_per_layer() == whole.cache.retained_per_layer()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_read_once_answers_as_one_pass(name):
    """A question fed after a fork of a full prefix (read once) gives one pass's logits, tokens and kept positions, models that build their own mask included."""
    _, model = models(name)
    ids = prompt()
    squeezed = compression(model, "snapkv")[0] if name in COMPRESSIBLE else None
    for question in (None, squeezed):
        whole = prefill(model, ids, question)
        prefix = read_prefix(model, ids[:, :-10], window_size=8)
        once = ask_after(model, prefix, ids[:, -10:], question)
        torch.testing.assert_close(once.logits, whole.logits, atol=1e-5, rtol=0)
        for a, b in zip(once.cache.layers, whole.cache.layers, strict=True):
            assert torch.equal(a.kept_positions(), b.kept_positions())
        assert list(decode(model, once, NEW_TOKENS, set())) == list(decode(model, whole, NEW_TOKENS, set()))


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "cohere2", "gpt-oss"])
def test_a_sliding_layers_window_reindexes_like_any_keys(name):
    """Read past the context, a sliding layer's kept window is re-rotated to its packed positions: layer 0 holds the keys the model computes there."""
    _, model = models(name)
    ids = prompt(n=96)
    method = make_method("snapkv")
    plan, _ = Budget(ratio=0.2).plan(96, len(prepare_model(model).compressed_layers), method.window_size)
    state = prefill(model, ids, squeeze(method, plan), chunk_size=32, reindex=Reindexer(rotary_layout(model.config)))
    layer = state.cache.layers[0]  # sliding in all three; its keys depend on the token and its position only
    assert layer.window == WINDOW and layer.length == WINDOW - 1
    kept, placed = layer.kept_positions()[0], layer.rope_positions()[0]
    assert torch.equal(kept, torch.arange(96 - WINDOW + 1, 96))
    assert torch.equal(placed, torch.arange(state.next_position - WINDOW + 1, state.next_position)) and placed[0] != kept[0]
    fresh = new_cache(model)  # the window's tokens fed afresh at their packed positions
    with torch.inference_mode():
        forward(model, fresh, ids[:, kept], int(placed[0]))
    torch.testing.assert_close(layer.view()[0], fresh.layers[0].view()[0], atol=1e-5, rtol=0)


def test_bypassing_attention_cannot_be_compressed():
    """A model whose attention bypasses kvcli's function is refused a compressing read (never a silent full cache), and runs full."""
    _, model = models("stablelm")
    squeezed, _ = compression(models("llama")[1], "snapkv")  # any plan: the refusal comes first
    with pytest.raises(UnsupportedAttention, match="use --method full"):
        prefill(model, prompt(), squeezed)
    assert "running with the full cache" in prepare_model(model).cannot_compress()


@pytest.mark.parametrize("name", ["gemma2", "gpt-oss"])
def test_the_features_kvcli_honours_change_these_models(name):
    """Gemma 2's softcapping and gpt-oss's sinks move the tiny models' logits by far more than 1e-5 (so the matrix's match tests them)."""
    reference, _ = models(name)
    stripped = copy.deepcopy(reference)
    with torch.no_grad():
        for layer in stripped.model.layers:
            if name == "gemma2":
                layer.self_attn.attn_logit_softcapping = None
            else:
                layer.self_attn.sinks.fill_(-1e4)  # a sink no query attends to: as if there were none
    ids = prompt()
    with torch.inference_mode():
        assert (reference(ids).logits[0, -1] - stripped(ids).logits[0, -1]).abs().max() > 1e-2


class _Module:
    is_causal = True


def test_attention_arguments_kvcli_does_not_implement_are_refused():
    """An attention argument kvcli does not know, a model-built mask or a bidirectional layer is refused in one line, never ignored."""
    query = torch.zeros(1, 4, 2, 16)
    attn = read_layer_attention(_Module(), query, None, 0.5, 0.0, {"sliding_window": 8, "softcap": 30.0, "position_ids": torch.arange(2)})
    assert (attn.scaling, attn.softcap, attn.sliding_window) == (0.5, 30.0, 8)
    for mask, kwargs, words in [(None, {"attention_chunk_size": 64}, "attention_chunk_size"), (torch.zeros(1), {}, "own attention mask")]:
        with pytest.raises(UnsupportedAttention, match=words) as info:
            read_layer_attention(_Module(), query, mask, 0.5, 0.0, kwargs)
        assert "\n" not in str(info.value)
    bidirectional = _Module()
    bidirectional.is_causal = False
    with pytest.raises(UnsupportedAttention, match="both directions"):
        read_layer_attention(bidirectional, query, None, 0.5, 0.0, {})


def test_a_model_kvcli_cannot_honour_is_refused_when_prepared():
    """A model with a layer kvcli cannot attend as it does is refused by the load-time probe, before any document is read."""
    model = build("llama")
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(UnsupportedAttention, match="LlamaAttention attends in both directions"):
        prepare_model(model)


def test_softcapped_sink_attention_matches_eager():
    """kvcli's block attention with softcapping, sinks and a window equals a direct eager computation (grouped heads included)."""
    gen = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen)
    sinks = torch.randn(4, generator=gen)
    from kvcli.attention import attend

    out = attend(query, key, value, LayerAttention(scaling=0.7, softcap=1.5, sinks=sinks, sliding_window=5))
    logits = (query @ key.repeat_interleave(2, 1).transpose(2, 3)) * 0.7
    logits = 1.5 * torch.tanh(logits / 1.5)
    rows, keys = torch.arange(14, 20)[:, None], torch.arange(20)[None, :]
    logits = logits.masked_fill(~((keys <= rows) & (keys > rows - 5)), float("-inf"))
    probs = torch.cat([logits, sinks.view(1, 4, 1, 1).expand(1, 4, 6, 1)], dim=-1).softmax(-1)[..., :-1]
    torch.testing.assert_close(out, (probs @ value.repeat_interleave(2, 1)).transpose(1, 2), atol=1e-6, rtol=0)


# --- the command line, with models saved as folders -------------------------------------------

runner = CliRunner()


def save_folder(name: str, folder: Path) -> Path:
    """Save the architecture's tiny model with a word-level tokenizer, as a user's checkpoint folder."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    build(name, max_positions=1024).save_pretrained(folder)  # `kvcli read` keeps room for a long answer
    tokenizer.save_pretrained(folder)
    return folder



def ask_json(folder: Path, tmp_path: Path, *flags: str) -> dict:
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{(7 * i) % 60}" for i in range(120)))
    result = runner.invoke(app, ["ask", str(doc), "w3?", "-m", str(folder), "--max-new-tokens", "3", "--json", *flags])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["stats"]


def test_ask_reports_what_sliding_layers_and_global_layers_keep(tmp_path, home):
    """`ask --json` on Gemma 3 marks the sliding layers, keeps their window, meets --ratio on the global layers, and counts the full cache from the tensors."""
    folder = save_folder("gemma3", tmp_path / "gemma3")
    stats = ask_json(folder, tmp_path, "--method", "snapkv", "--ratio", "0.25")
    assert stats["compressed"] and stats["layer_windows"] == [WINDOW, WINDOW, None, WINDOW]
    retained, n = stats["retained_per_layer"], stats["prompt_tokens"]
    question = stats["extra"]["question_tokens"]  # kept whole beside the document's budget
    assert [retained[i] for i in (0, 1, 3)] == [WINDOW - 1] * 3 and retained[2] == round(0.25 * (n - question)) + question
    assert stats["global_ratio"] == pytest.approx(retained[2] / n)
    entry = 2 * 2 * 16 * 4  # keys and values, 2 KV heads of 16 dims, float32
    assert stats["kv_bytes_full"] == entry * (n + 3 * (WINDOW - 1)) and stats["kv_bytes_kept"] == entry * sum(retained)


def test_inspect_a_saved_cache_knows_its_sliding_layers_without_the_model(tmp_path, home):
    """A Gemma 3 cache saved by `compress` records its layers' windows: `inspect FILE.kvc`, which loads no
    model, marks the sliding layers and counts the full cache as `compress` did."""
    folder = save_folder("gemma3", tmp_path / "gemma3")
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{(7 * i) % 60}" for i in range(120)))
    kvc = tmp_path / "doc.kvc"
    made = runner.invoke(app, ["compress", str(doc), "-o", str(kvc), "-m", str(folder), "--method", "snapkv", "--ratio", "0.25", "--json"])
    assert made.exit_code == 0, made.stderr
    compressed = json.loads(made.stdout)["stats"]
    shown = runner.invoke(app, ["inspect", str(kvc), "--json"])
    assert shown.exit_code == 0, shown.stderr
    stats = json.loads(shown.stdout)["stats"]
    assert stats["layer_windows"] == compressed["layer_windows"] == [WINDOW, WINDOW, None, WINDOW]
    for key in ("kv_bytes_full", "kv_bytes_kept", "retained_per_layer", "global_ratio"):
        assert stats[key] == pytest.approx(compressed[key]), key
    text = runner.invoke(app, ["inspect", str(kvc)]).stdout
    assert "sliding window" in text and "3 sliding-window layers" in text
    assert f"global layers {compressed['global_budget']:.1f} tokens/layer" in " ".join(text.split())  # the budget compress reported


# qwen2: transformers picks Qwen2Tokenizer by the model type, which makes no tokens of the word-level
# tokenizer these tests save (the next test); its RoPE is checked in test_rope.py
@pytest.mark.parametrize("name", [name for name in COMPRESSIBLE if name != "qwen2"])
def test_past_the_context_every_compressible_architecture_reads_the_whole_document(tmp_path, home, name):
    """A document past --max-context is read whole, re-indexed, on every architecture that compresses, gpt-oss's YaRN included."""
    folder = save_folder(name, tmp_path / name)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{(7 * i) % 60}" for i in range(300)))
    result = runner.invoke(app, ["ask", str(doc), "w3?", "-m", str(folder), "--method", "snapkv", "--max-context", "96",
                                 "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["read"] == "reindexed" and stats["dropped_tokens"] == 0 and stats["extra"]["past_window"]["chunks"] >= 3


def test_a_tokenizer_that_makes_no_tokens_is_refused_in_one_line(tmp_path, home):
    """A checkpoint whose tokenizer files do not fit the class transformers picks (here Qwen2Tokenizer over a word-level
    tokenizer.json) makes no tokens: refused in one line, not a traceback from the first layer."""
    folder = save_folder("qwen2", tmp_path / "qwen2")
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{i % 60}" for i in range(50)))
    result = runner.invoke(app, ["ask", str(doc), "w3?", "-m", str(folder), "--method", "snapkv", "--max-new-tokens", "3"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "makes no tokens of the document's 189 characters" in lines[0], result.stderr


@pytest.mark.parametrize("name, words", [("stablelm", "does not go through transformers' attention interface"),
                                         ("mistral-sliding", "no global layer to compress")])
def test_ask_says_when_nothing_could_be_compressed(tmp_path, home, name, words):
    """A bypassing attention (StableLM) or an all-sliding model (Mistral with a window) answers with compressed false and says why."""
    folder = save_folder(name, tmp_path / name)
    stats = ask_json(folder, tmp_path, "--method", "snapkv")
    assert not stats["compressed"] and words in stats["note"]
    assert stats["kv_bytes_kept"] == stats["kv_bytes_full"]


def test_text_report_marks_sliding_layers(tmp_path, home):
    """The text report names the sliding layers and shades their bars."""
    folder = save_folder("gemma2", tmp_path / "gemma2")
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{(7 * i) % 60}" for i in range(120)))
    result = runner.invoke(app, ["ask", str(doc), "w3?", "-m", str(folder), "--max-new-tokens", "2", "--method", "snapkv", "--ratio", "0.25"])
    assert result.exit_code == 0, result.stderr
    assert "2 sliding-window layers (▒) keep at most their last 11 tokens" in result.stderr
    assert "▒" * 3 in result.stderr and "global layers" in result.stderr
    # the question is kept whole in the global layers only: the budget line says so there, not of all layers' mean
    line = " ".join(result.stderr.split())
    assert re.search(r"global layers [\d.]+ tokens/layer = ratio [\d.]+, the question's \d+ tokens among them, kept whole beside "
                     r"the document's budget; all layers [\d.]+ tokens/layer = ratio [\d.]+( \(|$| )", line), line


def test_every_way_of_reading_keeps_the_sliding_windows(tmp_path, home):
    """On Gemma 3 every reading mode (default method, chunks, read once, --reuse, a saved cache, past the context) answers and keeps each sliding layer's window; a saved full prefix answers as a one-pass ask does."""
    folder = save_folder("gemma3", tmp_path / "gemma3")
    bare = ("--min-keep", "0")  # the bare default ratio: this short document is compressed
    runs = {
        "default": ask_json(folder, tmp_path, *bare),
        "chunked": ask_json(folder, tmp_path, "--method", "snapkv", "--chunk-size", "32", *bare),
        "reused": ask_json(folder, tmp_path, "--method", "snapkv", "--reuse", *bare),
        "past": ask_json(folder, tmp_path, "--method", "snapkv", "--max-context", "96", *bare),
    }
    doc = tmp_path / "doc.txt"
    for command, name, flags in (("read", "full.kvc", []), ("compress", "small.kvc", ["--method", "snapkv", *bare])):
        made = runner.invoke(app, [command, str(doc), "-o", str(tmp_path / name), "-m", str(folder), *flags])
        assert made.exit_code == 0, made.stderr
        result = runner.invoke(app, ["ask", "--cache", str(tmp_path / name), "w3?", "-m", str(folder), "--method", "dynamickv",
                                     "--max-new-tokens", "3", "--json", *bare])
        assert result.exit_code == 0, result.stderr
        runs[command] = json.loads(result.stdout)["stats"]
    assert runs["past"]["read"] == "reindexed" and runs["read"]["read"] == "once" and runs["compress"]["read"] == "saved"
    for mode, stats in runs.items():
        assert all(stats["retained_per_layer"][i] == WINDOW - 1 for i in (0, 1, 3)), mode
        assert stats["compressed"] or mode == "compress", mode
    alone = ask_json(folder, tmp_path, "--method", "dynamickv", *bare)
    assert runs["read"]["retained_per_layer"] == alone["retained_per_layer"]


@pytest.mark.parametrize("name, words", [("stablelm", "does not go through transformers' attention interface"),
                                         ("mistral-sliding", "attends over a sliding window")])
def test_past_the_context_a_model_that_cannot_be_reindexed_says_why(tmp_path, home, name, words):
    """A document past the context on a model kvcli cannot compress or re-index is refused in one line that says why."""
    folder = save_folder(name, tmp_path / name)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{(7 * i) % 60}" for i in range(120)))
    result = runner.invoke(app, ["ask", str(doc), "w3?", "-m", str(folder), "--method", "snapkv", "--max-context", "96", "--max-new-tokens", "3"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and words in lines[0], result.stderr


def test_the_probe_is_remembered_beside_the_model_not_on_it():
    """prepare_model probes a model once (later prefills reuse the layout) and sets no attribute of kvcli's on the model."""
    from kvcli import generate

    _, model = models(COMPRESSIBLE[0])
    before = set(vars(model))
    probes = []
    original = generate._probe
    generate._probe = lambda m: probes.append(m) or original(m)
    try:
        prepare_model(model)
        prefill(model, torch.randint(3, 60, (1, 12)))
    finally:
        generate._probe = original
    assert len(probes) <= 1 and not [name for name in set(vars(model)) - before if "kvcli" in name]
