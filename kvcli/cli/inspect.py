"""`kvcli inspect`: read and compress without answering; show where each layer's kept tokens fall."""

from __future__ import annotations

from typing import Annotated, Optional

import dataclasses

import typer
from rich.console import Console
from rich.text import Text

from ..errors import InputError
from .ask import ExcludeOpt, IncludeOpt
from .options import COMPRESSION, MODEL, OUTPUT, RunOptions, shared
from .output import print_json, user_errors
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
    """Run the prefill and compression without generating; show the retention profile.

    Example: kvcli inspect --layers paper.pdf --question "What dataset did they use?"
    """
    from ..inspect import render_profile, retention_profile
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
    kept = most_kept(reading.state.cache, prompt, doc, passages) if layers and passages else []
    if run.json:
        shown = {"profile": {**profile.to_dict(), "passages": [p.to_dict() for p in kept]}} if layers else {}
        print_json({"stats": stats.to_dict(), **shown})
        return
    console = Console(highlight=False)
    console.print(render(stats, every_layer=run.verbose))
    if layers:
        console.print(render_profile(profile))
    if kept:
        console.print(Text("\nmost-kept passages:", style="bold"))
        for passage in kept:
            heading = Text(passage.label, style="bold")
            heading.append(f"  ({100 * passage.score:.0f}% of the kept document tokens in all layers)", style="dim")
            console.print(heading)
            for line in passage.text.splitlines():
                console.print(Text("   " + line))


def most_kept(cache, prompt, doc, count: int) -> list:
    """The most-kept passage of each of the `count` pages or files whose tokens the layers kept most
    (`inspect.kept_scores`), scored as `--sources` scores attention: best pages first."""
    from ..ingest import Document
    from ..inspect import kept_scores
    from ..sources import SourceMap, passages

    source_map = SourceMap.of_prompt(doc, prompt)
    scores = source_map.char_scores(kept_scores(cache, len(prompt)))
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
