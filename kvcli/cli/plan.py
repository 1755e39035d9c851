"""`kvcli plan`: how a model will read documents, known before its weights load."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from typing import Annotated, Optional

import typer

from ..errors import InputError
from ..speed import clock
from .ask import ExcludeOpt, IncludeOpt
from .options import COMPRESSION, MODEL, OUTPUT, SKIM, RunOptions, shared
from .output import EXIT_USER_ERROR, Screen, print_json, say, user_errors
from .session import quiet_transformers, read_documents

MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", metavar="N", help="The answer's room, as `ask --max-new-tokens` keeps it: the prompt and the answer fit the positions.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="The system prompt `ask` would be given (it is part of the prompt).", show_default=False)]
_SOURCES_SHOWN = 20  # files or pages listed in the text output; --verbose and --json list them all
_WIDTH = 80  # the text output's lines, wrapped under their label
_LABEL = 9  # the labels' column, then two spaces


@user_errors
@shared(MODEL, COMPRESSION, SKIM, OUTPUT)
def plan(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Files, folders or - (stdin).", show_default=False, metavar="PATHS...")] = None,
    question: Annotated[Optional[str], typer.Option("--question", "-q", metavar="TEXT", help="The question to plan for [default: a short placeholder question].", show_default=False)] = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    system: SystemOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Show how a model will read documents, before its weights load: tokens per file or page, the
    model's positions, whether it reads past them and in how many chunks, the KV cache full and at
    the chosen --ratio or --budget, the weights, and the expected peak memory.

    Reads only the model's config and tokenizer (an embedded model not converted yet: its GGUF's
    metadata); without a tokenizer, token counts are estimated at 4 bytes of text per token. The
    peak is an estimate. Exits 2, after the plan, when the read would be refused.
    Example: kvcli plan report.pdf -m org/model --ratio 0.05 --device cuda
    """
    import torch

    from ..models import kvcli_home, resolve_device, resolve_precision
    from ..models.device import precision_name
    from ..models.describe import describe_model
    from ..prompt import check_question
    from ..reading.layout import Layout
    from ..reading.plan import PLACEHOLDER_QUESTION, KVBytes, make_plan
    from ..speed import measured_speed, names

    if not paths:
        raise InputError("no documents given; pass files, folders or - for stdin: kvcli plan FILE [-m MODEL]")
    run = dataclasses.replace(run, max_new_tokens=max_new_tokens, system=system)
    screen = Screen(run.quiet, run.json)
    method = run.make_method()
    options = run.options()
    options.check(method)
    if question is not None:
        check_question(question)
    device = resolve_device(run.device)
    dtype, stored = resolve_precision(run.dtype, device, run.device_map)  # stored: 'int8', or None (weights in `dtype`)
    doc = read_documents(list(paths), screen, include or (), exclude or ())
    quiet_transformers()
    with screen.status("reading the model's config and tokenizer") as update:
        described = describe_model(run.model, run.trust_remote_code, progress=update)
    profile = None
    if method.needs_profile or options.skim is not None:  # shipped for the embedded models, cached after a model's first read
        from ..models import config_hash
        from ..profile import stored_profile

        profile = stored_profile(described.name, config_hash(described.config))
    read_plan = make_plan(Layout(described.config, described.tokenizer), doc, question or PLACEHOLDER_QUESTION, options, method, dtype,
                          profile=profile)
    # int8 weights are one byte each (their per-channel scales are a rounding error of that)
    weights = None if described.params is None else described.params * (1 if stored else torch.finfo(dtype).bits // 8)
    peak = None if weights is None or read_plan.kv_peak is None else weights + read_plan.kv_peak
    available, total = device_memory(device)
    kv = KVBytes.of(described.config, dtype)
    speed = measured_speed(kvcli_home(), described.name, *names(device, precision_name(dtype, stored)))
    data = {
        "model": described.name,
        "source": described.source,
        "layers": kv.num_layers,
        "num_kv_heads": kv.num_kv_heads,
        "head_dim": kv.head_dim,
        "tokens_exact": described.exact_tokens,
        "notes": described.notes,
        "question": question,
        "method": method.name,
        "method_params": read_plan.method_params,
        "budget_label": options.budget.label,
        "plan": read_plan.to_dict(),
        "weights": {
            "params": described.params, "params_from": described.params_from, "bytes": weights, "dtype": stored or read_plan.dtype,
            "disk_bytes": described.disk_bytes, "stored_as": described.stored_as,
            "quantized": _quantization(described.config),
        },
        "peak_bytes": peak,
        "read_estimate": None if speed is None else {
            "seconds": round(speed.seconds(read_plan.prompt_tokens), 1), "reads": speed.reads, "tokens_per_s": round(speed.tokens_per_s, 1),
        },
        "device": {"name": str(device), "available_bytes": available, "total_bytes": total},
    }
    data["skim"] = _skim_plan(run, described, read_plan, profile)
    if run.json:
        print_json(data)
    else:
        for line in render(data, read_plan, method, options, speed, every_source=run.verbose):
            print(line)
    if read_plan.refused:
        say(f"kvcli: error: {read_plan.refused}")
        raise typer.Exit(EXIT_USER_ERROR)


def render(data: dict, read_plan, method, options, speed=None, every_source: bool = False) -> list[str]:
    """The plan as aligned lines for people, wrapped to 80 columns under their labels; `speed`
    (`speed.Speed`, this machine's recorded reads) estimates the read's time."""
    p = read_plan
    lines: list[tuple[str, str]] = []

    def add(label: str, text: str) -> None:
        lines.append((label, text))

    add("model", data["model"] if data["source"] == data["model"] else f"{data['model']} ({data['source']})")
    add("", f"{data['layers']} layers, {data['num_kv_heads']} KV heads x {data['head_dim']} dims, {p.trained_positions:,} positions")
    counted = "the model's tokenizer" if data["tokens_exact"] else "ESTIMATED at 4 bytes per token: no tokenizer"
    files = len(p.sources)
    add("tokens", f"{p.document_tokens:,} in {files} {'source' if files == 1 else 'sources'} ({counted})")
    shown = p.sources if every_source else p.sources[:_SOURCES_SHOWN]
    room = _WIDTH - _LABEL - 2 - 11  # the label column, then two spaces and the tokens
    width = min(room, max((len(s.label) for s in shown), default=0))
    for source in shown:
        label = source.label if len(source.label) <= room else "..." + source.label[-(room - 3):]  # a path's end names it
        add("", f"{label:<{width}}  {source.tokens:>9,}")
    if files > len(shown):
        rest = sum(s.tokens for s in p.sources[_SOURCES_SHOWN:])
        add("", f"... {files - _SOURCES_SHOWN} more: {rest:,} tokens (--json lists every one)")
    question = "" if data["question"] else " (no -q: planned with a placeholder question)"
    add("prompt", f"{p.prompt_tokens:,} tokens, {p.question_tokens} of them the question and the template's end{question}; "
                  f"{p.answer_tokens} more kept for the answer")
    add("read", _read_line(p))
    if not p.refused:
        add("time", _time_line(p, speed))
        if data.get("skim"):
            add("skim", _skim_line(data["skim"], p, speed))
    if p.trained_positions < p.positions:
        add("warning", f"--max-context {p.positions:,} passes the model's trained context ({p.trained_positions:,}); answers may degrade")
    if p.refused:
        add("refused", p.refused)
    add("budget", _budget_line(p, method, options))
    add("KV cache", _kv_line(p))
    if p.sliding is not None:
        windows = " or ".join(f"{w:,}" for w in p.sliding.windows)
        add("sliding", f"{p.sliding.layers} of {data['layers']} layers attend over a sliding window of {windows} tokens: never compressed, "
                       f"they hold {_mib(p.sliding.kv_held)} of the cache, and the budget is the {p.compressed_layers} global layers' "
                       "(predicted from the config; the loaded model's attention decides)")
    add("weights", _weights_line(data["weights"]))
    if data["peak_bytes"] is not None:
        add("peak", f"~{_mib(data['peak_bytes'])} expected: the weights plus the KV cache at its largest ({_mib(p.kv_peak)}, "
                    f"{'the prefill' if p.kv_peak == p.kv_prefill else 'kept plus the answer'}); an estimate: activations and the runtime are not counted")
    add("device", _device_line(data["device"], data["peak_bytes"]))
    for note in data["notes"]:
        add("note", note)
    indent = " " * (_LABEL + 2)
    return [wrapped for label, text in lines
            for wrapped in (textwrap.wrap(text, _WIDTH, initial_indent=f"{label:<{_LABEL}}  ", subsequent_indent=indent,
                                          break_long_words=False, break_on_hyphens=False) or [""])]


def _skim_plan(run, described, read_plan, profile) -> dict | None:
    """The prefill's work with and without --skim (asked or not), or None where it cannot be told."""
    from ..attention import ModelAttention
    from ..reading.skim import Skimming, skim_work

    layout = ModelAttention.from_config(described.config)
    if read_plan.refused or layout.cannot_compress():
        return None
    if profile is None:
        return {"asked": run.skim, "filter_layers": None}
    skimming = Skimming(tokens=run.skim_tokens, depth=run.skim_depth)
    work = skim_work(profile, layout.compressed_layers, layout.num_layers, skimming, read_plan.prompt_tokens, read_plan.document_tokens)
    return {"asked": run.skim, **work}


def _skim_line(skim: dict, p, speed) -> str:
    asked = "with --skim (asked)" if skim["asked"] else "with --skim"
    if skim["filter_layers"] is None:
        return f"{asked}: the filter's depth comes from the model's retrieval-head profile, computed on its first skim or evidencekv read"
    line = (f"{asked}: every token through {skim['filter_layers']} of {skim['layers']} layers, then {skim['continued_tokens']:,} through all: "
            f"{skim['share']:.0%} of a full read's token x layer work")
    if speed is not None:
        line += f" (~{clock(skim['share'] * speed.seconds(p.prompt_tokens))})"
    return line


def _time_line(p, speed) -> str:
    if speed is None:
        return "no reads of this model recorded on this machine yet, so no estimate (every read records its speed)"
    return f"~{clock(speed.seconds(p.prompt_tokens))} to read the prompt, an estimate based on {speed.basis()}"


def _read_line(p) -> str:
    if p.refused:
        return f"{p.prompt_tokens:,} tokens + {p.answer_tokens} for the answer do not fit the {p.positions:,} positions the model reads"
    used = f"{p.prompt_tokens + p.answer_tokens:,} of the {p.positions:,} positions"
    if p.past:
        return (f"past the positions: {p.prompt_tokens:,} tokens = {p.prompt_tokens / p.positions:.1f}x the {p.positions:,} the model reads; "
                f"read in {p.chunks} chunks of up to {p.chunk_size:,} tokens, compressing after each, positions re-indexed")
    if p.mode == "chunked":
        return f"in {p.chunks} chunks of {p.chunk_size:,} tokens (--chunk-size), compressing after each; {used}"
    cut = f", the middle cut: {p.dropped_tokens:,} document tokens dropped (--cut-middle)" if p.dropped_tokens else ""
    return f"one pass{cut}; {used}"


def _budget_line(p, method, options) -> str:
    if not method.compresses:
        return "full: every token kept"
    if p.budget is None:
        return f"{method.name} at {options.budget.label}: every token kept" + (f" ({p.budget_note})" if p.budget_note else "")
    line = f"{method.name} at {options.budget.label}: {p.tokens_per_layer:,.1f} tokens per layer (ratio {p.kept_ratio:.4f})"
    if p.question_tokens:  # kept whole beside the document's budget (methods.question_plan)
        line += f", the question's {p.question_tokens} among them"
    line += f", at most {p.most_kept:,} in one layer"
    return line + (f" ({p.budget_note})" if p.budget_note else "")


def _kv_line(p) -> str:
    per_token = f"{p.dtype}, {p.bytes_per_token / 1024:,.1f} KiB per token"
    if p.kv_kept is None:
        return f"{_mib(p.kv_full)} full ({per_token})"
    if p.kv_kept == p.kv_full:
        return f"{_mib(p.kv_full)} full, all kept ({per_token})"
    return f"{_mib(p.kv_kept)} kept of {_mib(p.kv_full)} full ({100 * p.kv_kept / p.kv_full:.1f}%; {per_token})"


def _weights_line(w: dict) -> str:
    if w["params"] is None:
        disk = f"; {_mib(w['disk_bytes'])} on disk" if w["disk_bytes"] else ""
        return f"unknown: neither the safetensors headers nor the config give the parameters{disk}"
    disk = f"; on disk {_mib(w['disk_bytes'])} {w['stored_as']}".rstrip() if w["disk_bytes"] else "; no weights file found"
    line = f"{_mib(w['bytes'])}: {w['params']:,} parameters as {w['dtype']} (from {w['params_from']}){disk}"
    if w["quantized"]:
        line += f"; quantized ({w['quantized']}): the loaded size depends on its kernels, counted here as {w['dtype']}"
    return line


def _device_line(device: dict, peak: int | None) -> str:
    line = device["name"]
    if device["available_bytes"] is None:
        return line + (f": {device['total_bytes'] / 2**30:,.1f} GiB in all" if device["total_bytes"] else "")
    line += f": {device['available_bytes'] / 2**30:,.1f} GiB available of {device['total_bytes'] / 2**30:,.1f} GiB"
    if peak is not None:
        line += ", enough for the expected peak" if peak < device["available_bytes"] else ", LESS than the expected peak"
    return line


def _quantization(config) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return str(method or "yes")


def device_memory(device) -> tuple[int | None, int | None]:
    """(available, total) bytes of the device's memory; (None, None) where it cannot be read."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        with open("/proc/meminfo") as info:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in info if line.split()[1:2] and line.split()[1].isdigit()}
        return fields.get("MemAvailable"), fields.get("MemTotal")
    except OSError:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return None, int(total)
        except (ValueError, OSError, AttributeError):
            return None, None


def _mib(n: int | None) -> str:
    """Bytes as people read them: KiB below a MiB, GiB from 10 GiB, MiB between (as the run report)."""
    if n is None:
        return "-"
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    if n >= 10 * 2**30:
        return f"{n / 2**30:,.1f} GiB"
    return f"{n / 2**20:,.1f} MiB"
