"""The retention profile as a picture: kept tokens per layer, and where in the document they are.

matplotlib is an optional extra (`pip install 'kvcli[plot]'`), imported only when a plot is drawn.
Figures are drawn on an Agg canvas directly, without pyplot, so no global backend state is touched.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path

from .atomic import check_output, writing
from .errors import InputError
from .inspect import PositionMap
from .stats import RunStats

FORMATS = (".png", ".svg")
FIG_WIDTH = 11  # inches
LABEL_PT = 8  # font size of the page and file labels


def check_target(path: str) -> Path:
    """The plot file, checked before any model work: known format, existing folder, matplotlib installed."""
    if Path(path).suffix.lower() not in FORMATS:
        raise InputError(f"--plot {path}: use a .png or .svg file name")
    if find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'kvcli[plot]'")
    return check_output(path, "--plot")


def _short_labels(labels: list[str], by: str) -> list[str]:
    """'report.pdf p.3' -> 'p.3' for a single PDF; files relative to the folder they share."""
    if by == "page" and len({label.rsplit(" p.", 1)[0] for label in labels}) == 1:
        return ["p." + label.rsplit(" p.", 1)[1] for label in labels]
    if by == "file" and len(labels) > 1:
        common = os.path.commonpath(labels) if all(not label.startswith("<") for label in labels) else ""
        if common and common not in labels:
            return [os.path.relpath(label, common) for label in labels]
    return labels


def _model_name(name: str) -> str:
    """A model spec short enough for a title: a path's last part, else the name as given."""
    return Path(name).name if os.sep in name or name.endswith(".gguf") else name


SLIDING_COLOR, GLOBAL_COLOR = "#9aa0a6", "#3b7dd8"


def save_retention_plot(target: Path, positions: PositionMap, stats: RunStats) -> None:
    """Draw kept tokens per layer (bars) beside a layer x document-position heat map, and save it."""
    figure = retention_figure(positions, stats)
    with writing(f"--plot {target}", "check the folder is writable and the disk has room"):
        figure.savefig(target, format=target.suffix.lower().lstrip("."))


def retention_figure(positions: PositionMap, stats: RunStats):
    """The figure `save_retention_plot` saves: sliding-window layers' bars in grey (they keep their window, uncompressed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_layers = len(positions.kept_fraction)
    fig = Figure(figsize=(FIG_WIDTH, 2.3 + 0.16 * num_layers), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 3, width_ratios=[1.1, 6, 0.15])
    bars = fig.add_subplot(grid[0, 0])
    heat = fig.add_subplot(grid[0, 1], sharey=bars)
    colorbar_ax = fig.add_subplot(grid[0, 2])

    layers = list(range(num_layers))
    windows = stats.layer_windows or [None] * num_layers
    colors = [GLOBAL_COLOR if window is None else SLIDING_COLOR for window in windows]
    bars.barh(layers, stats.retained_per_layer, height=0.8, color=colors)
    if any(window is not None for window in windows):
        from matplotlib.patches import Patch

        bars.legend(handles=[Patch(color=GLOBAL_COLOR, label="compressed"), Patch(color=SLIDING_COLOR, label="sliding window")],
                    fontsize=7, loc="lower left")
    bars.set_ylim(num_layers - 0.5, -0.5)  # layer 0 on top, as in the terminal view
    bars.invert_xaxis()  # bars grow towards the heat map, so each row reads across
    bars.set_ylabel("layer")
    bars.set_xlabel("kept tokens per layer")
    step = 1 if num_layers <= 16 else (2 if num_layers <= 40 else 4)
    bars.set_yticks(layers[::step])
    bars.grid(axis="x", alpha=0.3)

    image = heat.imshow(
        positions.kept_fraction,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        extent=(0, positions.doc_tokens, num_layers - 0.5, -0.5),
    )
    heat.tick_params(axis="y", labelleft=False)
    heat.set_xlabel("position in the document (prompt tokens)")
    heat.set_xlim(0, positions.doc_tokens)

    starts = [start for start, _ in positions.boundaries]
    labels = _short_labels([label for _, label in positions.boundaries], positions.by)
    for start in starts[1:]:
        heat.axvline(start, color="white", linewidth=0.8, alpha=0.8)
    if positions.cut is not None:
        heat.axvline(positions.cut, color="#ff5050", linewidth=1.5, linestyle="--")
    if starts:
        ends = starts[1:] + [positions.doc_tokens]
        middles = [(a + b) / 2 for a, b in zip(starts, ends)]
        # Label widths in tokens, from the heat map's width in points (about 0.6 em per character).
        tokens_per_pt = positions.doc_tokens / (FIG_WIDTH * 72 * 0.78)
        widths = [(len(label) * 0.6 * LABEL_PT + 8) * tokens_per_pt for label in labels]
        shown = _spread(middles, widths)
        rotation = 0
        if len(shown) < len(labels):  # upright labels collide: stand them on end, a line's height apart
            shown, rotation = _spread(middles, [1.4 * LABEL_PT * tokens_per_pt] * len(labels)), 90
        top = heat.secondary_xaxis("top")
        top.set_xticks([middles[i] for i in shown], [labels[i] for i in shown], rotation=rotation, fontsize=LABEL_PT)
        top.tick_params(length=0)
    elif positions.cut is not None:
        top = heat.secondary_xaxis("top")
        top.set_xticks([positions.cut], ["cut"], fontsize=8, color="#c03030")

    fig.colorbar(image, cax=colorbar_ax, label="fraction of tokens kept (mean over KV heads)")
    ratio = f"ratio {stats.ratio:.3f}, {stats.budget:.0f} tokens/layer" if stats.compressed else "not compressed"
    title = f"{_model_name(stats.model)} · {stats.method} · {ratio} · {stats.prompt_tokens}-token prompt"
    if positions.cut is not None:
        title += f" (red line: {stats.dropped_tokens} tokens cut from the middle)"
    fig.suptitle(title, fontsize=11)
    return fig


def _spread(middles: list[float], widths: list[float]) -> list[int]:
    """Indices of labels to draw, in order, leaving out any that would overlap the previous one."""
    shown: list[int] = []
    for i, x in enumerate(middles):
        if not shown or x - middles[shown[-1]] >= (widths[i] + widths[shown[-1]]) / 2:
            shown.append(i)
    return shown
