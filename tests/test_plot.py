"""`kvcli inspect --plot`: the per-layer position map it draws from, the picture files, the errors."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app
from kvcli.ingest import read_documents
from kvcli.cache import KVLayer
from kvcli.inspect import position_map, retention_profile
from kvcli.stats import RunStats

runner = CliRunner()


@dataclass
class FakePrompt:
    """A prompt whose token i is document character `offsets[i]` (None: template or question)."""

    offsets: list[int | None]
    cut_at: int | None = None
    cut_len: int = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def doc_offset(self, position: int) -> int | None:
        return self.offsets[position]


def layer_keeping(*heads: list[int]) -> KVLayer:
    """A cache layer whose KV heads kept these prompt positions (same count per head)."""
    positions = torch.tensor(heads, dtype=torch.long)  # (num_kv_heads, n_kept)
    layer = KVLayer()
    layer.load(torch.zeros(1, *positions.shape, 2), torch.zeros(1, *positions.shape, 2), positions)
    return layer


@pytest.fixture
def two_files(tmp_path):
    """A document of two files, 'a.txt' then 'b.txt', read by ingest (so it has headers and spans)."""
    (tmp_path / "a.txt").write_text("alpha " * 10)
    (tmp_path / "b.txt").write_text("beta " * 10)
    return read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])


def test_position_map_fractions_and_boundaries(two_files):
    """Each bucket holds the share of its document tokens kept, averaged over KV heads; files start where their text does."""
    doc = two_files
    second = doc.sources[1].start
    # two template tokens, ten document tokens (five per file), one question token
    offsets = [None, None] + [i * 5 for i in range(5)] + [second + i * 5 for i in range(5)] + [None]
    prompt = FakePrompt(offsets)
    everything = list(range(len(offsets)))
    cache = SimpleNamespace(layers=[
        layer_keeping(everything, everything),
        layer_keeping([0, 1, 12], [0, 1, 12]),  # template and question only
        layer_keeping([2, 3, 4, 5, 6], [7, 8, 9, 10, 11]),  # head 0 the first file, head 1 the second
    ])
    result = position_map(cache, prompt, doc, buckets=2)
    assert result.doc_tokens == 10 and result.bucket_edges == [0, 5, 10]
    assert result.kept_fraction == [[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]]
    assert [start for start, _ in result.boundaries] == [0, 5]
    assert [label.rsplit("/", 1)[-1] for _, label in result.boundaries] == ["a.txt", "b.txt"]
    assert result.by == "file" and result.cut is None


def test_retention_profile_splits_each_layer_over_the_files(two_files):
    """retention_profile counts each layer's kept prompt tokens per file (mean over KV heads), the rest as the prompt's own part."""
    doc = two_files
    second = doc.sources[1].start
    offsets = [None, None] + [i * 5 for i in range(5)] + [second + i * 5 for i in range(5)] + [None]
    cache = SimpleNamespace(layers=[
        layer_keeping([0, 1, 12], [0, 1, 12]),
        layer_keeping([2, 3, 4, 5, 13], [7, 8, 9, 10, 14]),  # 13 and 14 are generated tokens: not counted
    ])
    cache.retained_per_layer = lambda: [3, 5]
    cache.windows = [None, None]  # no sliding-window layer
    profile = retention_profile(cache, FakePrompt(offsets), doc)
    assert profile.by == "file" and profile.group_tokens == [5, 5, 3]
    assert profile.per_layer == [[0.0, 0.0, 3.0], [2.0, 2.0, 0.0]]
    assert profile.groups[-1] == "prompt (template, question)"


def test_position_map_marks_the_cut_and_ignores_generated_positions(two_files):
    """The cut is where the tail's offsets resume; positions past the prompt (generated tokens) are not counted."""
    doc = two_files
    offsets = [0, 5, 10, None, 40, 45]  # the marker token between head and tail has no offset
    prompt = FakePrompt(offsets, cut_at=12, cut_len=20)
    cache = SimpleNamespace(layers=[layer_keeping([0, 4, 6, 7])])
    result = position_map(cache, prompt, doc, buckets=100)
    assert result.cut == 3 and result.doc_tokens == 5
    assert len(result.kept_fraction[0]) == 5  # never more buckets than tokens
    assert result.kept_fraction[0] == [1.0, 0.0, 0.0, 1.0, 0.0]


def fake_stats(num_layers: int) -> RunStats:
    return RunStats(
        model="/models/tiny.gguf", method="dynamickv", method_params={}, ratio=0.1, budget=12.0, prompt_tokens=120,
        compressed=True, note="", window_text="", retained_per_layer=[12] * num_layers, kv_bytes_full=1, kv_bytes_kept=1, kv_bytes_peak=1,
        peak_memory_bytes=0, load_s=0.0, prefill_s=0.0,
    )


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_plot_file_is_written(two_files, tmp_path, suffix, magic):
    """save_retention_plot writes a PNG or an SVG, whichever the file name asks for."""
    pytest.importorskip("matplotlib")
    from kvcli.inspect import PositionMap
    from kvcli.plot import save_retention_plot

    positions = PositionMap(
        kept_fraction=[[0.1 * (i % 10)] * 20 for i in range(4)], bucket_edges=list(range(0, 101, 5)),
        boundaries=[(0, "src/a.py"), (40, "src/b.py")], cut=70, doc_tokens=100, by="file",
    )
    target = tmp_path / f"profile{suffix}"
    save_retention_plot(target, positions, fake_stats(4))
    assert target.read_bytes().startswith(magic)


def test_sliding_window_layers_are_drawn_apart_from_compressed_ones():
    """Sliding-window layers' bars are grey, with a legend; without sliding layers there is no legend."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from kvcli.inspect import PositionMap
    from kvcli.plot import GLOBAL_COLOR, SLIDING_COLOR, retention_figure

    positions = PositionMap(kept_fraction=[[0.5] * 4 for _ in range(4)], bucket_edges=[0, 25, 50, 75, 100],
                            boundaries=[(0, "a.txt")], cut=None, doc_tokens=100, by="file")
    stats = fake_stats(4)
    stats.layer_windows = [12, 12, None, 12]
    bars = retention_figure(positions, stats).axes[0]
    assert [to_hex(p.get_facecolor()) for p in bars.patches[:4]] == [SLIDING_COLOR, SLIDING_COLOR, GLOBAL_COLOR, SLIDING_COLOR]
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["compressed", "sliding window"]
    assert retention_figure(positions, fake_stats(4)).axes[0].get_legend() is None


def test_inspect_plot_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    """`inspect --plot` on a tiny random Llama writes the PNG and still prints the terminal profile."""
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    model = save_tiny_llama(tmp_path / "tiny")
    (tmp_path / "docs").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "docs" / name).write_text(" ".join(f"w{i % 60}" for i in range(40)))
    target = tmp_path / "out.png"
    result = runner.invoke(app, ["inspect", str(tmp_path / "docs"), "--plot", str(target), "-m", str(model), "--ratio", "0.5"])
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes().startswith(b"\x89PNG")
    assert "retained tokens per layer" in result.stdout and f"wrote {target}" in result.stderr


@pytest.mark.parametrize("name,words", [("out.jpg", ".png or .svg"), ("missing/out.png", "does not exist")])
def test_bad_plot_target_fails_before_the_model(tmp_path, name, words):
    """An unknown extension or a missing folder is a one-line error, before any model is loaded."""
    result = runner.invoke(app, ["inspect", "samples/python_exceptions.txt", "--plot", str(tmp_path / name), "-m", str(tmp_path / "no-model")])
    assert result.exit_code == 2
    assert result.stderr.startswith("kvcli: error: --plot") and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    """Without matplotlib, --plot fails at once with the pip command for the extra."""
    import kvcli.plot

    monkeypatch.setattr(kvcli.plot, "find_spec", lambda name: None)
    result = runner.invoke(app, ["inspect", "samples/python_exceptions.txt", "--plot", str(tmp_path / "out.png")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "kvcli: error: --plot needs matplotlib: pip install 'kvcli[plot]'"
