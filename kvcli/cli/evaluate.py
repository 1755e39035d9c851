"""`kvcli eval`: score compression methods on a dataset or a needle-in-a-haystack grid."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import BudgetError, InputError
from .options import MODEL, RunOptions, shared
from .output import Screen, err, print_json, user_errors
from .batch import RayAddressOpt, RayOpt, WorkersOpt, check_ray_options, ray_pool
from .session import load, prepare, read_documents

NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_ANSWER = "Dolores Park"


def split_list(option: str, value: str | None, kind: type) -> list | None:
    """'32,64,128' as [32, 64, 128]; None stays None."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise InputError(f"{option} is empty; give comma-separated values")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise InputError(f"{option} must be comma-separated {'integers' if kind is int else 'numbers'}, got {value!r}") from None


@user_errors
@shared(MODEL)
def eval_(
    data: Annotated[Optional[str], typer.Option("--data", metavar="FILE.jsonl", help="LongBench-style JSONL: context, input, answers, optional _id.", show_default=False)] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", metavar="NAME", help="contains, qa_f1, rouge_l or choice [default: qa_f1; contains with --niah].", show_default=False)] = None,
    methods_list: Annotated[str, typer.Option("--methods", metavar="A,B,...", help="Comma-separated methods, or all (every registered method).")] = "all",
    budgets: Annotated[Optional[str], typer.Option("--budgets", metavar="N,N,...", help="Comma-separated mean tokens kept per layer [default: 32,64,128,256].", show_default=False)] = None,
    ratios: Annotated[Optional[str], typer.Option("--ratios", metavar="R,R,...", help="Comma-separated fractions of the KV cache kept (instead of --budgets).", show_default=False)] = None,
    min_keep: Annotated[Optional[int], typer.Option("--min-keep", metavar="N", help="Keep at least N tokens per layer at each of --ratios (as ask's --min-keep with --ratio): scores what ask's default keeps.", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", metavar="N", help="Only the first N rows.", show_default=False)] = None,
    template: Annotated[Optional[str], typer.Option("--template", metavar="TEXT", help="User message with {context} and {input}, e.g. LongBench's per-dataset prompt.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE.json", help="Write the results to this file; FILE.json.partial.jsonl beside it logs samples as they finish, so a rerun resumes.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object on stdout instead of tables.")] = False,
    niah: Annotated[bool, typer.Option("--niah", help="Needle in a haystack instead of --data: a length x depth grid.")] = False,
    haystack: Annotated[Optional[str], typer.Option("--haystack", metavar="PATH", help="NIAH: a text file or folder of text files to hide the needle in.", show_default=False)] = None,
    needle: Annotated[str, typer.Option("--needle", metavar="TEXT", help="NIAH: the sentence to hide.")] = NIAH_NEEDLE,
    niah_question: Annotated[str, typer.Option("--question", "-q", metavar="TEXT", help="NIAH: the question about the needle.")] = NIAH_QUESTION,
    answer: Annotated[str, typer.Option("--answer", metavar="TEXT", help="NIAH: the text a correct answer contains.")] = NIAH_ANSWER,
    lengths: Annotated[str, typer.Option("--lengths", metavar="N,N,...", help="NIAH: comma-separated prompt lengths in model tokens.")] = "1000,2000,4000,7000",
    depths: Annotated[str, typer.Option("--depths", metavar="D,D,...", help="NIAH: comma-separated needle depths, 0 (start) to 1 (end).")] = "0,0.25,0.5,0.75,1",
    modes: Annotated[str, typer.Option("--modes", metavar="query,reuse,reuse-repeat,chunked,skim", help="How each prompt is read, comma-separated to compare: query (the question in the window), reuse (a generic instruction ranks the reused prefix: ask --reuse --scorer instruction), reuse-repeat (the repeat ranks it: ask --reuse and compress by default), chunked (as ask --chunk-size), skim (as ask --skim).")] = "query",
    skim_tokens: Annotated[Optional[int], typer.Option("--skim-tokens", metavar="N", help="For --modes skim: document tokens read through every layer [default: as ask --skim].", show_default=False)] = None,
    skim_depth: Annotated[Optional[float], typer.Option("--skim-depth", metavar="F", help="For --modes skim: the deepest filter layer as a fraction of the layers [default: as ask --skim].", show_default=False)] = None,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", metavar="N", help="Chunk length in tokens for --modes chunked [default: 1024].", show_default=False)] = None,
    window: Annotated[int, typer.Option("--window", metavar="N", help="Observation window of every compressing method.")] = 8,
    param: Annotated[Optional[list[str]], typer.Option("--param", metavar="KEY=VALUE", help="A method knob, applied to the listed methods that have it; repeatable.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="N", help="Stop each answer after this many tokens (raise it for summaries).")] = 64,
    max_context: Annotated[Optional[int], typer.Option("--max-context", metavar="N", help="Positions the model reads (prompt plus answer) [default: the model's own]; a longer row is read whole in chunks with re-indexed positions.", show_default=False)] = None,
    cut_middle: Annotated[bool, typer.Option("--cut-middle", help="Cut the middle of a row longer than --max-context instead of reading it whole.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-Q", help="No progress or timing on stderr.")] = False,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Score compression methods on a dataset or a needle-in-a-haystack grid; print mean scores per method x budget.

    Each sample is read once (one prefill) and every method x budget is derived from it, then
    answered greedily. Examples: kvcli eval --data qasper.jsonl --metric qa_f1 --limit 50 -o qasper.json;
    kvcli eval --niah --haystack samples/haystack.txt --methods full,snapkv,dynamickv --budgets 64,128 --lengths 2000
    """
    from ..eval import EvalConfig, get_metric, log_path, niah_rows, read_rows, render, run_eval, write_json
    from ..methods import REGISTRY, configure

    if haystack and not niah:
        raise InputError("--haystack is for --niah runs; add --niah or drop --haystack")
    if niah == (data is not None):
        raise InputError("give --data FILE.jsonl or --niah (with --haystack), not both" if niah else "give --data FILE.jsonl or --niah --haystack PATH")
    metric = metric or ("contains" if niah else "qa_f1")
    get_metric(metric)
    budget_values = split_list("--budgets", budgets, int)
    ratio_values = split_list("--ratios", ratios, float)
    if budget_values is not None and ratio_values is not None:
        raise BudgetError("give --budgets or --ratios, not both")
    if budget_values is None and ratio_values is None:
        budget_values = [32, 64, 128, 256]
    if min_keep is not None and ratio_values is None:
        raise BudgetError("--min-keep floors --ratios, and --budgets are kept as given: add --ratios or drop --min-keep")
    names = split_list("--methods", methods_list, str)
    if names == ["all"]:
        names = list(REGISTRY)
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    out = None
    if output:
        from ..atomic import check_output

        out = check_output(output, "--output")
        check_output(log_path(out), "--output", append=True)  # the progress log beside it, appended to as samples finish
    mode_names = split_list("--modes", modes, str)
    if chunk_size is not None and "chunked" not in mode_names:
        raise InputError("--chunk-size is for --modes chunked; add chunked to --modes or drop --chunk-size")
    if "chunked" in mode_names and chunk_size is None:
        chunk_size = 1024
    if (skim_tokens is not None or skim_depth is not None) and "skim" not in mode_names:
        raise InputError("--skim-tokens and --skim-depth are for --modes skim; add skim to --modes or drop them")
    from ..reading.skim import DEFAULT_SKIM_TOKENS, Skimming

    skimming = Skimming(tokens=DEFAULT_SKIM_TOKENS if skim_tokens is None else skim_tokens, depth=skim_depth)
    config = EvalConfig(
        methods=configure(names, param, window), budgets=budget_values, ratios=ratio_values, metric=metric,
        max_new_tokens=max_new_tokens, template=template, max_context=max_context, modes=tuple(mode_names), chunk_size=chunk_size,
        fit="cut" if cut_middle else "reindex", min_keep=min_keep, skim=skimming,
    )
    config.settings()  # bad settings fail before the model loads
    use_ray = check_ray_options(ray, ray_address, workers)
    if use_ray:
        from ..batch.ray_pool import import_ray

        import_ray()  # says how to install it before anything slow
    screen = Screen(quiet, json_out)
    reader = None
    if niah:
        if not haystack:
            raise InputError("--niah needs --haystack PATH (a text file or a folder of text files)")
        length_values = split_list("--lengths", lengths, int)
        depth_values = split_list("--depths", depths, float)
        hay = read_documents([haystack], screen)
        reader = load(run, screen)  # with --ray too: the grid is sized in the model's tokens
        rows = niah_rows(hay.text, needle, niah_question, answer, length_values, depth_values, reader.tokenizer)[:limit]
    else:
        rows = read_rows(data, limit=limit)
    pool = None
    if use_ray:
        from ..eval.runner import ScoreRows

        reader = None  # the workers load their own
        pool = ray_pool(run, ScoreRows(config), screen, workers, ray_address)
    else:
        if reader is None:
            reader = load(run, screen)
        for method in config.methods:
            prepare(reader, method, screen)
    try:
        with screen.progress("eval", "samples") as update:
            result = run_eval(reader, rows, config, log_path(out) if out else None, progress=update, pool=pool)
    finally:
        if pool is not None:
            pool.close()
    if out is not None:
        write_json(out, result)
    if json_out:
        print_json(result.to_dict())
    else:
        Console(highlight=False).print(render(result))
    if not quiet:
        timing = result.timing
        if timing["resumed_samples"]:
            err.print(f"{timing['resumed_samples']} samples taken from {log_path(out)}", markup=False)
        err.print(
            f"prefill {timing['capture_s']:.1f}s for {len(timing['rows'])} rows; derive {timing['derive_s']:.1f}s, "
            f"decode {timing['decode_s']:.1f}s for {len(result.samples) - timing['resumed_samples']} samples",
            markup=False,
        )
        if out is not None:
            err.print(f"wrote {out}", markup=False)
