"""Where each layer's kept tokens fall in the documents: by PDF page, by file, or by position.

`retention_profile` groups them for the terminal; `position_map` keeps the fine detail a plot needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .stats import RunStats, add_kept_rows, fact_table, heads_summary, layers_summary, method_text, mib


_SPARK = " ▁▂▃▄▅▆▇█"
OUTSIDE = "prompt (template, question)"
# a saved cache's prompt stops before the question; a compressed one's holds the instruction it was scored by
SAVED_OUTSIDE = "prompt (template, instruction)"


@dataclass
class Profile:
    """Kept tokens per layer, split over groups of the document (mean over KV heads)."""

    groups: list[str]  # labels: pages, files or position buckets, then the non-document part
    group_tokens: list[int]  # prompt tokens in each group
    pages: list[int | None]  # PDF page number per group, where there is one
    per_layer: list[list[float]]  # [layer][group] kept tokens (mean over KV heads)
    retained_per_layer: list[int]
    by: str  # 'page', 'file' or 'position'
    # per layer: a sliding-window layer's window (it keeps its latest tokens whatever the method); None: a global layer
    layer_windows: list[int | None] | None = None

    def to_dict(self) -> dict:
        return {
            "by": self.by,
            "groups": [
                {"label": label, "page": page, "prompt_tokens": n}
                for label, page, n in zip(self.groups, self.pages, self.group_tokens)
            ],
            "retained_per_layer": self.retained_per_layer,
            "layer_windows": self.layer_windows or [None] * len(self.retained_per_layer),
            "kept_per_layer_per_group": [[round(x, 2) for x in row] for row in self.per_layer],
        }


def _group_of_positions(prompt, doc, buckets: int, outside_label: str = OUTSIDE) -> tuple[list[int], list[str], list[int | None], str]:
    """For every prompt position, the index of its group; and the groups' labels and pages."""
    labels: list[str] = []
    pages: list[int | None] = []
    index: dict[str, int] = {}
    several = len(doc.sources) > 1
    by = "page" if any(s.page is not None for s in doc.sources) else ("file" if several else "position")
    length = max(1, len(doc.text))
    if by == "position":
        for b in range(buckets):
            labels.append(f"{100 * b // buckets}-{100 * (b + 1) // buckets}%")
            pages.append(None)
    else:
        for source in doc.sources:
            label = doc.label(source)
            if label not in index:
                index[label] = len(labels)
                labels.append(label)
                pages.append(source.page)
    outside = len(labels)
    labels.append(outside_label)
    pages.append(None)
    groups = []
    for position in range(len(prompt)):
        offset = prompt.doc_offset(position)
        if offset is None:
            groups.append(outside)
        elif by == "position":
            groups.append(min(buckets - 1, offset * buckets // length))
        else:
            source = doc.source_at(offset)
            groups.append(index[doc.label(source)] if source is not None else outside)
    return groups, labels, pages, by


def retention_profile(cache, prompt, doc, buckets: int = 10, outside_label: str = OUTSIDE) -> Profile:
    """Split each layer's kept prompt tokens over the document's pages, files or position buckets;
    the prompt's other tokens are one group, `outside_label`."""
    group_list, labels, pages, by = _group_of_positions(prompt, doc, buckets, outside_label)
    group_of = torch.tensor(group_list, dtype=torch.long)
    group_tokens = torch.bincount(group_of, minlength=len(labels)).tolist()
    per_layer = [layer.kept_per_group(group_of, len(labels)).tolist() for layer in cache.layers]
    return Profile(labels, group_tokens, pages, per_layer, cache.retained_per_layer(), by, cache.windows)


def render_profile(profile: Profile, top: int = 3) -> Group:
    """Per layer, one line: a strip with one cell per group (darker = a larger share kept), and the
    top groups, cut with an ellipsis where the console is too narrow for them."""
    doc_groups = len(profile.groups) - 1
    legend = Text(f"{doc_groups} {profile.by} groups, one cell each, in order; a cell is the fraction of that group's tokens "
                  "the layer kept, scaled per row")
    return Group(legend, _ProfileRows(profile, top))  # the per-layer bars are already in the run report


class _ProfileRows:
    """The profile's table, one line per layer at any width: the strip and the top groups are cut to fit."""

    def __init__(self, profile: Profile, top: int) -> None:
        self.profile, self.top = profile, top

    def __rich_console__(self, console, options):
        profile = self.profile
        doc_groups = len(profile.groups) - 1
        header = f"kept share by {profile.by}"
        layer_w = max(len("layer"), len(str(len(profile.per_layer) - 1)))
        strip_w = max(1, min(max(doc_groups, len(header)), (options.max_width - layer_w) // 2))
        best_w = max(1, options.max_width - layer_w - strip_w - 4)  # two gaps of two spaces
        rows = []
        windows = profile.layer_windows or [None] * len(profile.per_layer)
        for i, row in enumerate(profile.per_layer):
            shares = [row[g] / profile.group_tokens[g] if profile.group_tokens[g] else 0.0 for g in range(doc_groups)]
            peak = max(shares) if shares and max(shares) > 0 else 1.0
            strip = Text("".join(_SPARK[round((len(_SPARK) - 1) * s / peak)] for s in shares),
                         style="yellow" if windows[i] is not None else "magenta")
            total = sum(row) or 1.0
            ranked = sorted(range(len(row)), key=lambda g: -row[g])[: self.top]
            best = Text(", ".join(f"{profile.groups[g]} {100 * row[g] / total:.0f}%" for g in ranked if row[g] > 0))
            if windows[i] is not None:
                best = Text(f"sliding window: its last {windows[i] - 1} tokens" + (f"; {best}" if best else ""))
            strip.truncate(strip_w, overflow="ellipsis")
            best.truncate(best_w, overflow="ellipsis")
            rows.append((str(i), strip, best))
        table = Table(box=None, show_header=True, pad_edge=False, padding=(0, 2), collapse_padding=True)
        table.add_column("layer", justify="right", width=layer_w, no_wrap=True)
        table.add_column(header[:strip_w], width=strip_w, no_wrap=True)
        table.add_column("most kept", width=max([len("most kept")] + [len(best) for _, _, best in rows]), no_wrap=True)
        for row in rows:
            table.add_row(*row)
        yield table


def kept_scores(cache, prompt_len: int) -> dict[int, float]:
    """{prompt position: in how many layers it was kept (each layer counting the share of its KV
    heads that kept it)}, for the prompt's positions that any layer kept: what `inspect` cites
    its most-kept passages by."""
    totals = torch.zeros(prompt_len, dtype=torch.float32)
    for layer in cache.layers:
        heads = layer.head_positions()  # (n_kept,) per KV head
        positions = torch.cat(heads).cpu()
        inside = positions[positions < prompt_len]
        totals += torch.bincount(inside, minlength=prompt_len)[:prompt_len].float() / len(heads)
    where = torch.nonzero(totals > 0).flatten().tolist()
    return dict(zip(where, totals[where].tolist()))


@dataclass
class PositionMap:
    """Per layer, the fraction of the document's tokens kept along the document, in equal buckets.

    The x axis runs over the document's tokens in the prompt (template and question left out),
    so a cut document shows its head and tail side by side with the cut marked.
    """

    kept_fraction: list[list[float]]  # [layer][bucket]: share of the bucket's tokens kept, mean over KV heads
    bucket_edges: list[int]  # document-token index where each bucket starts, then doc_tokens
    boundaries: list[tuple[int, str]]  # (document-token index where a page or file starts, its label)
    cut: int | None  # document-token index where the tail resumes after a middle cut, if any
    doc_tokens: int
    by: str  # 'page', 'file' or 'position' (no boundaries)


def position_map(cache, prompt, doc, buckets: int = 200) -> PositionMap:
    """Bucket each layer's kept document tokens along the document, with page or file boundaries."""
    doc_positions, boundaries, cut = [], [], None
    label = None
    for position in range(len(prompt)):
        offset = prompt.doc_offset(position)
        if offset is None:
            continue
        if cut is None and prompt.cut_at is not None and offset >= prompt.cut_at + prompt.cut_len:
            cut = len(doc_positions)
        source = doc.source_at(offset)
        if source is not None and doc.label(source) != label:  # separators between sources have none
            label = doc.label(source)
            boundaries.append((len(doc_positions), label))
        doc_positions.append(position)
    n = len(doc_positions)
    buckets = max(1, min(buckets, n))
    bucket_of = torch.arange(n) * buckets // max(1, n)  # (doc_tokens,)
    bucket_size = torch.bincount(bucket_of, minlength=buckets).clamp(min=1).float()
    # every prompt position's bucket; template and question tokens go to one extra bucket, dropped
    group_of = torch.full((len(prompt),), buckets, dtype=torch.long)
    group_of[torch.tensor(doc_positions, dtype=torch.long)] = bucket_of
    rows = [(layer.kept_per_group(group_of, buckets + 1)[:buckets] / bucket_size).tolist() for layer in cache.layers]
    edges = [-(-b * n // buckets) for b in range(buckets)] + [n]  # first index i with i * buckets // n == b
    by = "page" if any(s.page is not None for s in doc.sources) else ("file" if len(doc.sources) > 1 else "position")
    return PositionMap(rows, edges, boundaries if by != "position" else [], cut, n, by)


class SavedPrompt:
    """A saved cache's prompt as the profile reads a prompt: where each position's token starts in the
    documents (`SourceMap.offsets`, -1 outside them). A saved file does not record a middle cut."""

    cut_at = None
    cut_len = 0

    def __init__(self, offsets: list[int]) -> None:
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def doc_offset(self, position: int) -> int | None:
        offset = self.offsets[position]
        return None if offset < 0 else offset


def saved_stats(saved, file_bytes: int) -> RunStats:
    """What a `.kvc` (`store.SavedCache`) holds, as a run's report counts it: kept per layer and
    head, the bytes kept against the full cache of its prompt (its layers' windows as recorded).
    Nothing was timed: no model ran."""
    meta, cache = saved.meta, saved.cache
    prompt_len = saved.prompt_tokens
    kept = sum(layer.mean_length() for layer in cache.layers)
    full = saved.kind == "full"
    stats = RunStats(
        model=str(meta.get("model", "?")),
        method="full" if full else str(meta.get("method", "?")),
        method_params={} if full else dict(meta.get("method_params") or {}),
        ratio=kept / max(1, cache.num_layers * prompt_len),
        budget=kept / max(1, cache.num_layers),
        prompt_tokens=prompt_len,
        compressed=bool(meta.get("compressed", False)) and not full,
        note=str(meta.get("note") or ("a full prefix: each question is compressed query-aware when it is asked" if full else "")),
        window_text=str(meta.get("window_text") or ""),
        retained_per_layer=cache.retained_per_layer(),
        layer_windows=cache.windows,
        kv_bytes_full=cache.full_nbytes(prompt_len),
        kv_bytes_kept=cache.nbytes(),
        kv_bytes_peak=int(meta.get("kv_peak_bytes") or 0),
        peak_memory_bytes=0,
        load_s=0.0,
        prefill_s=0.0,
        read="saved",
        dtype=str(meta.get("storage_dtype") or meta.get("dtype") or ""),
    )
    heads = heads_summary(cache.head_lengths(), cache.windows)
    if heads is not None:
        stats.extra["heads"] = heads
    stats.extra["file"] = {"bytes": file_bytes, "kind": saved.kind, "format_version": meta.get("format_version"),
                           "kvcli_version": meta.get("kvcli_version"), "windows_recorded": "layer_windows" in meta,
                           "sources": [s.get("name") for s in meta.get("sources") or []]}
    return stats


def render_saved(path: str, stats: RunStats, every_layer: bool = False) -> Group:
    """The report of `kvcli inspect FILE.kvc`: what the file holds, its budget and heads, the bytes kept, and the layers."""
    facts = fact_table()
    file = stats.extra["file"]
    made = "kvcli read: every token; each question compresses it query-aware" if file["kind"] == "full" else \
        "kvcli compress: compressed without the questions"
    facts.add_row("file", f"{path} ({mib(file['bytes'])}, cache format {file['format_version']}, kvcli {file['kvcli_version'] or '?'})")
    facts.add_row("made by", made)
    facts.add_row("model", f"{stats.model} ({stats.dtype})" if stats.dtype else stats.model)
    facts.add_row("method", method_text(stats))
    sources = file["sources"]
    shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    facts.add_row("prompt", f"{stats.prompt_tokens} tokens" + (f" of {shown}" if shown else "") + " (the prompt before a question)")
    unknown = "" if file["windows_recorded"] else " (counted as if every layer were global: this file does not record its sliding windows)"
    heads = add_kept_rows(facts, stats, kv_note=unknown)
    return Group(facts, layers_summary(stats.retained_per_layer, stats.layer_windows, every_layer, bool(heads)))
