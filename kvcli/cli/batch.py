"""`kvcli batch`: every question of a jobs file answered into one JSONL file, resumably, here or on Ray."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..defaults import DEFAULT_METHOD
from ..errors import InputError, KvcliError
from .options import COMPRESSION, GENERATION, MODEL, SKIM, RunOptions, shared
from .output import EXIT_INTERRUPTED, Screen, err, is_out_of_memory, out_of_memory, say, user_errors
from .session import load, prepare
from .sources import SourcesOpt, check_count

RayOpt = Annotated[bool, typer.Option("--ray", help="Run on Ray workers, each loading the model once: one per GPU, or --workers on CPU (a local Ray is started unless --ray-address is given). Needs pip install 'kvcli[ray]'.")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDR", help="Join a running Ray cluster (e.g. ray://head:10001, or auto) instead of starting a local one; implies --ray.", show_default=False)]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", metavar="N", help="With --ray: how many workers [default: one per GPU; without GPUs, 1], sharing the CPUs evenly.", show_default=False)]


def describe_error(exc: BaseException) -> str | None:
    """The one line `ask` prints for a job's failure (a user error, out of memory); None for a bug."""
    if isinstance(exc, KvcliError):
        return str(exc)
    if is_out_of_memory(exc):
        return out_of_memory(exc)
    return None


def check_ray_options(ray: bool, ray_address: str | None, workers: int | None) -> bool:
    """Whether to run on Ray; --workers without it is an error."""
    use_ray = ray or ray_address is not None
    if workers is not None and not use_ray:
        raise InputError("--workers is for --ray; add --ray or drop --workers")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    return use_ray


def ray_pool(run: RunOptions, work, screen: Screen, workers: int | None, address: str | None):
    """A `batch.ray_pool.RayPool` running `work`, started with a status line."""
    from ..batch import ModelSpec
    from ..batch.ray_pool import RayPool

    from ..threads import parse_threads

    spec = ModelSpec.of(run.model, run.device, run.dtype, run.trust_remote_code, threads=parse_threads(run.threads),
                        device_map=run.device_map)
    with screen.status("starting Ray workers (each loads the model)"):
        pool = RayPool(spec, work, workers=workers, address=address, report=lambda line: screen.note(f"kvcli: {line}"))
    screen.note(f"kvcli: {pool.workers} Ray worker{'s' if pool.workers != 1 else ''} running {spec.model}"
                + (", one GPU each" if "num_gpus" in pool.resources else f", {pool.resources['num_cpus']} CPU{'s' if pool.resources['num_cpus'] != 1 else ''} each"))
    return pool


@contextlib.contextmanager
def _progress(screen: Screen, total: int):
    """A bar over the jobs with done / failed / remaining on a terminal; yields the callback."""
    if not screen.show_progress:
        yield lambda counts: None
        return
    bar = Progress(TextColumn("batch"), BarColumn(), TextColumn("{task.fields[text]}"), TimeElapsedColumn(), console=err, transient=True)
    task = bar.add_task("batch", total=total, text=f"0 done, 0 failed, {total} remaining")
    bar.start()
    try:
        yield lambda c: bar.update(task, completed=c.done + c.failed, text=f"{c.done} done, {c.failed} failed, {c.remaining} remaining")
    finally:
        bar.stop()


@user_errors
@shared(MODEL, COMPRESSION, SKIM, GENERATION)
def batch(
    jobs_file: Annotated[str, typer.Argument(help="JSONL jobs file: one object a line with documents (paths, globs or folders) and question or questions; optional id, method, ratio, budget.", metavar="JOBS.jsonl")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="ANSWERS.jsonl", help="Where the answers go, one JSON row per question; a rerun skips the questions answered there and asks the failed ones again.")],
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-Q", help="No progress or summary on stderr.")] = False,
    sources: SourcesOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Answer every question of a jobs file about its documents, each document read once, into one JSONL file.

    Each row: job, documents, question, answer and the --json stats (or error, the line `ask` would
    print, for a job whose document cannot be read; the batch goes on), and with --sources the
    passages each answer drew on (as `ask --json --sources` gives them). Rows are written whole as
    jobs finish, so a rerun resumes. Example: kvcli batch jobs.jsonl -o answers.jsonl --ratio 0.05 --ray
    """
    from ..batch import AnswerJobs, AnswersFile, LocalPool, read_jobs, run_batch

    check_count(sources)
    use_ray = check_ray_options(ray, ray_address, workers)
    if Path(output).resolve() == Path(jobs_file).resolve():
        raise InputError("--output is the jobs file; write the answers to another file")
    if use_ray:
        from ..batch.ray_pool import import_ray

        import_ray()  # says how to install it before anything slow
    screen = Screen(quiet)
    jobs = read_jobs(jobs_file, run.method or DEFAULT_METHOD, run.param, run.window, run.options())
    if sources:  # an answer without its passages is not what --sources asks for: keyed apart
        jobs = [dataclasses.replace(job, sources=sources) for job in jobs]
    answers = AnswersFile(output)
    work = AnswerJobs(describe_error, sources)
    if use_ray:
        pool = ray_pool(run, work, screen, workers, ray_address)
    else:
        reader = load(run, screen)
        for method in {job.method.name: job.method for job in jobs}.values():
            prepare(reader, method, screen)
        if sources and jobs:
            prepare(reader, jobs[0].method, screen, why="--sources")
        pool = LocalPool(reader, work)
    try:
        with _progress(screen, len(jobs)) as update:
            counts = run_batch(jobs, pool, answers, describe_error, progress=update)
    except KeyboardInterrupt:
        if not quiet:
            say(f"\nkvcli: interrupted; every finished job is in {output}: run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        pool.close()
    if answers.dropped_errors:
        screen.note(f"kvcli: asked again {answers.dropped_errors} question{'s' if answers.dropped_errors != 1 else ''} that had failed in an earlier run")
    if answers.kept_foreign:
        screen.note(f"kvcli: kept {answers.kept_foreign} rows of jobs not in {jobs_file}")
    screen.note(
        f"kvcli: {counts.total} jobs: {counts.done} answered" + (f" ({counts.resumed} in an earlier run)" if counts.resumed else "")
        + f", {counts.failed} failed"
        + (f", {counts.retried} run again after their worker died" if counts.retried else "")
        + f"; {counts.rows} rows written to {output}"
    )
