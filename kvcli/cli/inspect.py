"""`kvcli inspect`: read and compress without answering; show where each layer's kept tokens fall.
Given a saved cache (`FILE.kvc`) it shows the same of that file, without loading a model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import dataclasses

import typer
from rich.console import Console
from rich.text import Text

from ..errors import InputError
from .ask import ExcludeOpt, IncludeOpt
from .options import COMPRESSION, MODEL, OUTPUT, RunOptions, shared
from .output import Screen, print_json, user_errors
from .session import start, warn_prompt


@user_errors
@shared(MODEL, COMPRESSION, OUTPUT, max_new_tokens=1)
def inspect(
    files: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin).", show_default=False, metavar="PATHS...")],
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="Show where each layer's kept tokens fall in the documents (pages, files or positions); --no-layers shows the report alone.")] = True,
    question: Annotated[Optional[str], typer.Option("--question", "-q", metavar="TEXT", help="The question to compress for [default: the summary instruction].", show_default=False)] = None,
    buckets: Annotated[int, typer.Option("--buckets", metavar="N", help="Position buckets for a single document without pages or files.")] = 10,
    passages: Annotated[int, typer.Option("--passages", metavar="N", help="Under the profile, the text of the most-kept passage of each of the N pages or files that kept the most (one text: its N most-kept passages; 0: none).")] = 5,
    plot: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png|FILE.svg", help="Also draw the profile (bars per layer, heat map over the document); needs kvcli[plot].", show_default=False)] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Run the prefill and compression without generating; show the retention profile. Given a
    saved cache (FILE.kvc), show what it kept, per layer and KV head, and where, without a model.

    Example: kvcli inspect --layers paper.pdf --question "What dataset did they use?"
    """
    from ..inspect import retention_profile
    from ..prompt import check_question, summary_instruction
    from ..reading import QueryAware, run_stats
    from ..stats import render

    if question is not None:
        check_question(question)
    if buckets < 1:
        raise InputError(f"--buckets must be at least 1, got {buckets}")
    if passages < 0:
        raise InputError(f"--passages must be 0 or more, got {passages}")
    plot_target = None
    if plot is not None:
        from ..plot import check_target

        plot_target = check_target(plot)  # before the model runs, so a typo costs nothing
    saved = _saved_file(files)
    if saved is not None:
        _inspect_saved(saved, run, layers, buckets, passages, plot_target, question is not None, bool(include or exclude))
        return
    started = start(run, files, include or (), exclude or ())
    screen, method, options, doc, reader = started.screen, started.method, started.options, started.doc, started.reader
    mode = QueryAware(reader, doc.text, options)
    question = question or summary_instruction()
    prompt = mode.prompt(question)
    mode.check(question, method)
    warn_prompt(reader, options, prompt, screen, method)
    with screen.layers(reader.num_layers) as on_layer:
        reading = mode.read(question, method, on_layer=on_layer)
    stats = run_stats(reader, reading)
    if doc.encodings:
        stats.extra["encodings"] = doc.encodings
    profile = retention_profile(reading.state.cache, prompt, doc, buckets=buckets)
    if plot_target is not None:
        from ..inspect import position_map
        from ..plot import save_retention_plot

        save_retention_plot(plot_target, position_map(reading.state.cache, prompt, doc), stats)
        screen.note(f"wrote {plot_target}")
    from ..sources import SourceMap

    kept = most_kept(reading.state.cache, SourceMap.of_prompt(doc, prompt), passages) if layers and passages else []
    show(render(stats, every_layer=run.verbose), stats, profile if layers else None, kept, run.json)


def show(report, stats, profile, kept: list, as_json: bool) -> None:
    """Print the report, the profile (None: not asked for) and the most-kept passages, or all of it as JSON."""
    from ..inspect import render_profile

    if as_json:
        shown = {"profile": {**profile.to_dict(), "passages": [p.to_dict() for p in kept]}} if profile is not None else {}
        print_json({"stats": stats.to_dict(), **shown})
        return
    console = Console(highlight=False)
    console.print(report)
    if profile is not None:
        console.print(render_profile(profile))
    if kept:
        console.print(Text("\nmost-kept passages:", style="bold"))
        for passage in kept:
            heading = Text(passage.label, style="bold")
            heading.append(f"  ({100 * passage.score:.0f}% of the kept document tokens in all layers)", style="dim")
            console.print(heading)
            for line in passage.text.splitlines():
                console.print(Text("   " + line))


def most_kept(cache, source_map, count: int) -> list:
    """The most-kept passage of each of the `count` pages or files whose tokens the layers kept most
    (`inspect.kept_scores`), scored as `--sources` scores attention: best pages first. `source_map`
    (a `sources.SourceMap`) maps the cache's prompt positions to the documents."""
    from ..ingest import Document
    from ..inspect import kept_scores
    from ..sources import passages

    doc = source_map.document
    scores = source_map.char_scores(kept_scores(cache, len(source_map.offsets)))
    if len(doc.sources) == 1:  # one text: its `count` most-kept passages
        return passages(doc, scores, count)
    total = sum(scores.values()) or 1.0
    ranked = sorted(doc.sources, key=lambda s: -sum(v for k, v in scores.items() if s.start <= k < s.end))[:count]
    found = []
    for source in ranked:
        within = {k: v for k, v in scores.items() if source.start <= k < source.end}
        best = passages(Document(doc.text, (source,)), within, 1)
        if best:
            share = sum(within[k] for k in within if best[0].start <= k < best[0].end) / total
            found.append(dataclasses.replace(best[0], score=share))
    return found


def _saved_file(files: list[str]) -> str | None:
    """The saved cache to inspect, when one is given (alone), else None."""
    saved = [f for f in files if Path(f).suffix == ".kvc" and not os.path.isdir(f)]  # a name too long to look up is no folder
    if not saved:
        return None
    if len(files) > 1:
        raise InputError(f"inspect a saved cache alone: kvcli inspect {saved[0]} (it holds its documents; give other files in another run)")
    return saved[0]


def _inspect_saved(path: str, run: RunOptions, layers: bool, buckets: int, passages: int, plot_target, question: bool,
                   globs: bool) -> None:
    """`kvcli inspect FILE.kvc`: the file as saved, read without a model (no weights load, nothing runs)."""
    from ..inspect import SAVED_OUTSIDE, SavedPrompt, position_map, render_saved, retention_profile, saved_stats
    from ..reading.cite import saved_source_map
    from ..store import load_cache

    screen = Screen(run.quiet, run.json)
    ignored = [flag for flag, given in (("--question", question), ("--include/--exclude", globs)) if given]
    ignored += run.given_flags("method", "ratio", "budget", "param", "min_keep", "window", "chunk_size", "max_context")
    if ignored:
        screen.warn(f"{', '.join(ignored)} ignored: {path} is shown as it was saved")
    saved = load_cache(path, None, "")  # any model's file: its tensors and metadata, checked against its checksum
    stats = saved_stats(saved, Path(path).stat().st_size)
    source_map = saved_source_map(saved)
    profile, kept = None, []
    if saved.kind == "full" and (layers or plot_target is not None):
        screen.note(f"{path} is a full prefix: it keeps every token, so there is no profile of what it kept")
    elif source_map is None and (layers or plot_target is not None):
        screen.warn(f"{path} does not record where its tokens came from in the documents (saved by an older kvcli): "
                    "no profile over them; compress or read the documents again for one")
    elif source_map is not None:
        prompt = SavedPrompt(source_map.offsets)
        if layers:
            profile = retention_profile(saved.cache, prompt, source_map.document, buckets=buckets, outside_label=SAVED_OUTSIDE)
            kept = most_kept(saved.cache, source_map, passages) if passages else []
        if plot_target is not None:
            from ..plot import save_retention_plot

            save_retention_plot(plot_target, position_map(saved.cache, prompt, source_map.document), stats)
            screen.note(f"wrote {plot_target}")
    show(render_saved(path, stats, every_layer=run.verbose), stats, profile, kept, run.json)
