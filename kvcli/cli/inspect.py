"""`kvcli inspect`: read and compress without answering; show where each layer's kept tokens fall."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

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
    if run.json:
        print_json({"stats": stats.to_dict(), **({"profile": profile.to_dict()} if layers else {})})
        return
    console = Console(highlight=False)
    console.print(render(stats, every_layer=run.verbose))
    if layers:
        console.print(render_profile(profile))
