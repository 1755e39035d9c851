"""Saved caches (.kvc): round trip, and refusal of other models, formats and damaged files."""

from __future__ import annotations

import json

import pytest
import torch

from kvcli.cache import KVCache
from kvcli.errors import InputError, OutputError
from kvcli.store import FORMAT_VERSION, load_cache, save_cache


def small_cache(num_layers: int = 3) -> KVCache:
    """A cache whose layers hold different numbers of tokens, as after compression."""
    cache = KVCache(num_layers)
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(cache.layers):
        n = 5 + 3 * i
        keys = torch.randn(1, 2, n, 4, generator=gen)
        values = torch.randn(1, 2, n, 4, generator=gen)
        positions = torch.sort(torch.randperm(40, generator=gen)[: 2 * n].view(2, n), dim=1).values
        layer.load(keys, values, positions)
    return cache


META = {
    "model": "m", "config_hash": "abc", "weights_fingerprint": "w1", "dtype": "float32",
    "method": "dynamickv", "method_params": {}, "prompt_tokens": 40,
}


def rewrite_file_header(path, change) -> None:
    """Edit the safetensors JSON header of a .kvc file in place (keeping its tensors' bytes)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + size :])


def rewrite_header(path, change) -> None:
    """Edit the JSON metadata of a .kvc file in place (keeping its tensors)."""

    def edit(header):
        meta = json.loads(header["__metadata__"]["kvcli"])
        change(meta)
        header["__metadata__"]["kvcli"] = json.dumps(meta)

    rewrite_file_header(path, edit)


def test_round_trip_keeps_every_layer(tmp_path):
    """Saving then loading gives back each layer's keys, values and positions exactly."""
    cache = small_cache()
    path = tmp_path / "doc.kvc"
    save_cache(path, cache, META)
    loaded = load_cache(path, "abc", "m", weights_fingerprint="w1")
    assert loaded.meta["format_version"] == FORMAT_VERSION == 4 and loaded.meta["weights_fingerprint"] == "w1"
    assert loaded.prompt_tokens == 40 and loaded.meta["method"] == "dynamickv"
    for a, b in zip(cache.layers, loaded.cache.layers):
        assert torch.equal(a.kept_positions(), b.kept_positions())
        for x, y in zip(a.view(), b.view()):
            assert torch.equal(x, y)
    assert loaded.cache.retained_per_layer() == [5, 8, 11]


def test_write_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves neither a partial .kvc nor a temp file behind."""
    path = tmp_path / "doc.kvc"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OutputError, match="disk full"):  # the OS's refusal, as one line for the user
        save_cache(path, small_cache(), META)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, word",
    [
        (lambda m: m.update(config_hash="other"), "made with model"),
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "format"),
        (lambda m: m.update(format="something-else"), "not a kvcli cache"),
    ],
)
def test_mismatched_metadata_is_refused(tmp_path, change, word):
    """A cache from another model, another format version, or not from kvcli is refused with a clear message."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), META)
    rewrite_header(path, change)
    with pytest.raises(InputError, match=word):
        load_cache(path, "abc", "m")


def test_other_weights_of_the_same_architecture_are_refused(tmp_path):
    """A cache made with the same config but other weights (a fine-tune) is refused in one line naming the cause."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), META)
    with pytest.raises(InputError, match="other weights of the same architecture than 'm' .a fine-tune") as info:
        load_cache(path, "abc", "m", dtype=torch.float32, weights_fingerprint="w2")
    assert str(info.value).startswith(f"{path} was made with") and "\n" not in str(info.value)
    assert "compress the documents again with this model" in str(info.value)


def test_float16_on_one_side_only_names_the_dtype(tmp_path):
    """A fingerprint mismatch between a float16 and a float32 load suggests --dtype, not a fine-tune."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), dict(META, dtype="float16"))
    with pytest.raises(InputError, match="--dtype float16") as info:
        load_cache(path, "abc", "m", dtype=torch.float32, weights_fingerprint="w2")
    assert "fine-tune" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, word",
    [
        (lambda m: m.update(format_version=1), "older kvcli in cache format 1, which does not record the model's weights"),
        (lambda m: m.pop("weights_fingerprint"), "does not record which weights made it"),
    ],
)
def test_files_without_a_weights_fingerprint_are_refused(tmp_path, change, word):
    """A format-1 file, or any file without a stored weights fingerprint, is refused with a request to re-compress."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), META)
    rewrite_header(path, change)
    for fingerprint in ("w1", None):
        with pytest.raises(InputError, match=word) as info:
            load_cache(path, "abc", "m", weights_fingerprint=fingerprint)
        assert "compress the documents again" in str(info.value)


def test_saving_needs_a_weights_fingerprint(tmp_path):
    """save_cache refuses metadata without the model's weights fingerprint, and writes nothing."""
    meta = {k: v for k, v in META.items() if k != "weights_fingerprint"}
    with pytest.raises(ValueError, match="weights_fingerprint"):
        save_cache(tmp_path / "doc.kvc", small_cache(), meta)
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_refused(tmp_path):
    """A .kvc cut short is refused as truncated."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), META)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(InputError, match="truncated|corrupted"):
        load_cache(path, "abc", "m")


def test_flipped_bytes_are_refused(tmp_path):
    """A .kvc whose tensor bytes changed fails its checksum."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), META)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="corrupted"):
        load_cache(path, "abc", "m")


def test_missing_and_non_kvcli_files_are_refused(tmp_path):
    """A missing path and a file that is not a cache each give an InputError naming what to do."""
    with pytest.raises(InputError, match="does not exist"):
        load_cache(tmp_path / "nope.kvc", "abc", "m")
    other = tmp_path / "notes.kvc"
    other.write_text("hello world, not a cache")
    with pytest.raises(InputError, match="kvcli cache|truncated"):
        load_cache(other, "abc", "m")


def test_clone_is_independent():
    """A cloned cache can grow without changing the original (several questions, one prefix)."""
    cache = small_cache()
    copy = cache.clone()
    layer = copy.layers[0]
    layer.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), torch.tensor([99]))
    assert cache.retained_per_layer() == [5, 8, 11]
    assert copy.retained_per_layer() == [6, 8, 11]


FULL_META = dict(META, kind="compressed", next_position=1234, method_params={"window_size": 32, "kernel_size": 7},
                 sources=[{"path": "notes/a.txt", "start": 0, "end": 120}, {"path": "notes/b.txt", "start": 120, "end": 400}])


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(prompt_tokens=41),
        lambda m: m.update(next_position=1235),
        lambda m: m["method_params"].update(window_size=33),
        lambda m: m["sources"][1].update(end=401),
        lambda m: m["sources"][0].update(path="notes/c.txt"),
        lambda m: m.update(num_layers=2),
        lambda m: m.update(kind="full"),
        lambda m: m.update(extra_field=1),
    ],
    ids=["prompt_tokens", "next_position", "method_knob", "source_end", "source_name", "num_layers", "kind", "added_field"],
)
def test_a_one_digit_metadata_edit_is_refused(tmp_path, change):
    """A .kvc whose metadata was changed in one field (one digit of a number, a source, a knob) is refused as damaged, in one line."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), FULL_META)
    assert load_cache(path, "abc", "m").meta["next_position"] == 1234  # the file loads as written
    rewrite_header(path, change)
    with pytest.raises(InputError, match="corrupted .its checksum does not match.; compress the documents again") as info:
        load_cache(path, "abc", "m", weights_fingerprint="w1")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h["layer.0.keys"].update(shape=[1, 2, 4, 5]),  # the same bytes read as another shape
        lambda h: h["layer.1.values"].update(dtype="I32"),  # the same bytes read as another dtype
        lambda h: h.update({"layer.0.keys": h["layer.0.values"], "layer.0.values": h["layer.0.keys"]}),  # names swapped
        lambda h: h["layer.0.keys"].update(data_offsets=[0, float("inf")]),  # JSON's Infinity: int() overflows
        lambda h: h["layer.1.values"].update(shape=[1, float("inf"), 4, 5]),
    ],
    ids=["shape", "dtype", "names", "infinite_offset", "infinite_shape"],
)
def test_an_edited_tensor_header_is_refused(tmp_path, change):
    """A .kvc whose safetensors header reads the same bytes as other shapes, dtypes or tensors is refused as damaged."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), META)
    rewrite_file_header(path, change)
    with pytest.raises(InputError, match="corrupted"):
        load_cache(path, "abc", "m")


def test_a_format_2_file_is_refused_in_one_line(tmp_path):
    """A file of cache format 2, whose checksum covered its tensors only, is refused with a line saying so and what to do."""
    path = tmp_path / "doc.kvc"
    save_cache(path, small_cache(), META)
    rewrite_header(path, lambda m: m.update(format_version=2))
    with pytest.raises(InputError, match="older kvcli in cache format 2, whose checksum does not cover its metadata; compress the documents again"):
        load_cache(path, "abc", "m", weights_fingerprint="w1")


def test_a_bfloat16_file_loads_into_the_models_dtype(tmp_path):
    """A cache saved in bfloat16 loads into the model's float32, equal to the bfloat16 values, positions exact."""
    cache = small_cache()
    path = tmp_path / "doc.kvc"
    save_cache(path, cache, META, dtype=torch.bfloat16)
    loaded = load_cache(path, "abc", "m", dtype=torch.float32)
    assert loaded.meta["storage_dtype"] == "bfloat16"
    for a, b in zip(cache.layers, loaded.cache.layers):
        assert torch.equal(a.kept_positions(), b.kept_positions())
        for x, y in zip(a.view(), b.view()):
            assert y.dtype == torch.float32 and torch.equal(x.bfloat16().float(), y)


def test_a_file_records_its_sliding_windows_and_reads_without_its_model(tmp_path):
    """The layers' sliding windows are saved (under the checksum) and given back on load; a file
    without them (written before kvcli recorded them) loads with every layer global; `config_hash`
    None reads a file of any model (what `kvcli inspect FILE.kvc` does), still checking its bytes."""
    cache = small_cache()
    cache.adopt_windows([None, 6, None])
    path = tmp_path / "doc.kvc"
    save_cache(path, cache, META)
    assert load_cache(path, "abc", "m").cache.windows == [None, 6, None]
    assert load_cache(path, None, "").cache.windows == [None, 6, None]  # another model's name and hash: no matter
    rewrite_header(path, lambda meta: meta.update(layer_windows=[None, 7, None]))
    with pytest.raises(InputError, match="corrupted"):
        load_cache(path, None, "")
    older = tmp_path / "older.kvc"
    save_cache(older, small_cache(), META)
    rewrite_header(older, lambda meta: meta.pop("layer_windows"))
    resum(older)  # as an older kvcli wrote it: no windows, and a checksum over what it wrote
    assert load_cache(older, None, "").cache.windows == [None, None, None]


def resum(path) -> None:
    """Write into a .kvc whose metadata a test edited the checksum it would have had when written so."""
    from safetensors.torch import load_file

    from kvcli.store import _FILE_DTYPES, _Checksum

    tensors = load_file(path)
    names = {dtype: name for name, dtype in _FILE_DTYPES.items()}

    def fix(meta):
        checksum = _Checksum(meta)
        for name in sorted(tensors):
            checksum.add(name, names[tensors[name].dtype], tensors[name])
        meta["sha256"] = checksum.hexdigest()

    rewrite_header(path, fix)
