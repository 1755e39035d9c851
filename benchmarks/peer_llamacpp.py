"""kvcli against llama.cpp on the same GGUF: the same prompt token ids, chat template and greedy decode (issue 27).

    python benchmarks/peer_llamacpp.py --llama-python /work/llamacpp-venv/bin/python --tokens 6000 --pairs 3
    python benchmarks/peer_llamacpp.py --kvcli-args "--dtype bfloat16" --json peer-bf16.json

The document is the start of samples/haystack.txt (CPython's Language Reference), cut at a line
so that the whole prompt is about `--tokens` tokens (or `--document FILE`, whole). The prompt's
token ids are built by kvcli's own code (`kvcli.ingest.read_documents`, the chat template and
layout of `kvcli.prompt` through `reading.layout.Layout`, the model's tokenizer), and llama.cpp is
fed exactly those ids; the script stops with an error if `kvcli ask --json` reports another prompt
length. Both stop at the same end-of-sequence ids (kvcli's `Reader.eos_ids`) or `--max-new-tokens`.

Runs alternate, kvcli then llama.cpp, `--pairs` times, each in its own process with `--threads`
threads (kvcli: `--threads N` for prefill and decode; llama.cpp: n_threads and n_threads_batch).
kvcli is run as a user runs it, `python -m kvcli ask DOC QUESTION --json ...` plus `--kvcli-args`,
so its default method (a compressed cache) is what is measured unless those args say otherwise.
llama.cpp runs through llama-cpp-python, in `--llama-python` (a venv of its own: `pip install
-e '.[benchmark]'` there, or any python that imports llama_cpp), with this same file as the worker.

Measured per run: prompt tokens; prefill tokens/s (prompt tokens over the prefill's seconds);
decode tokens/s (tokens after the first over the seconds from the first token to the last, as
kvcli's `decode_tokens_per_s`); time to first token (prefill plus the first pick); peak RSS, the
child's `ru_maxrss` from `os.wait4` (per process, not the RUSAGE_CHILDREN maximum). kvcli restarts
its peak after loading the model (`stats.reset_peak_memory`) and the llama.cpp worker does the
same, so both peaks run from the end of the load to the exit. Markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HAYSTACK = ROOT / "samples" / "haystack.txt"
QUESTION = "Explain in detail, with examples, what the document above says about assignment statements."
LLAMA_VENV_PYTHON = Path("/work/llamacpp-venv/bin/python")  # where the integrator's machine builds it (docs/bench.md)
INSTALL_HINT = "pip install -e '.[benchmark]' (builds llama.cpp from source), or pass --llama-python with a venv's python that has llama-cpp-python"
METRICS = ("prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_rss_bytes")


# --------------------------------------------------------------------------- llama.cpp side (runs in --llama-python)


def llama_worker(job: dict) -> dict:
    """Load the GGUF, prefill `job["ids"]`, decode greedily; only the standard library and llama_cpp here."""
    import llama_cpp

    ids, max_new = job["ids"], job["max_new_tokens"]
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=job["gguf"], n_ctx=len(ids) + max_new + 8, n_threads=job["threads"], n_threads_batch=job["threads"],
        n_batch=job["n_batch"], n_ubatch=job["n_batch"], verbose=False,
    )
    load_s = time.perf_counter() - started
    _reset_peak()  # as kvcli does after its load
    stop = set(job["eos_ids"])
    began = time.perf_counter()
    llm.eval(ids)
    prefilled = time.perf_counter()
    prompt_tokens = llm.n_tokens
    tokens = []
    token = llm.sample(temp=0.0, repeat_penalty=1.0)  # temperature 0: llama.cpp's greedy sampler
    first_at = time.perf_counter()
    while token not in stop:  # kvcli's rule (`generate.decode`): an end-of-sequence id ends the answer and is not counted
        tokens.append(token)
        if len(tokens) == max_new:
            break
        llm.eval([token])
        token = llm.sample(temp=0.0, repeat_penalty=1.0)
    finished = time.perf_counter()
    return {
        "prompt_tokens": prompt_tokens, "load_s": load_s, "prefill_s": prefilled - began,
        "ttft_s": first_at - began, "decode_tokens": len(tokens), "decode_s": finished - first_at if tokens else 0.0,
        "tokens": tokens, "peak_rss_self_bytes": _status_bytes("VmHWM"),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "system_info": llama_cpp.llama_print_system_info().decode(),
    }


# The llama.cpp worker runs in a python that need not have kvcli (its own venv): these two
# repeat kvcli.stats's peak reset and /proc reader with the standard library only.
def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux: VmHWM and ru_maxrss restart from the current RSS
    except OSError:
        pass


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- the prompt, as kvcli builds it


def load_text_side(model: str):
    """The model's config, tokenizer and the ids kvcli stops on, without its weights (`kvcli plan`'s way)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from kvcli.cli.session import quiet_transformers
    from kvcli.models.describe import describe_model
    from kvcli.reading import Reader

    quiet_transformers()
    described = describe_model(model)
    try:
        generation = GenerationConfig.from_pretrained(described.source, local_files_only=True)
    except (OSError, ValueError):
        generation = GenerationConfig.from_model_config(described.config)
    # Reader.eos_ids itself, on a stand-in holding what it reads (the loaded model's configs and the tokenizer)
    stand_in = SimpleNamespace(model=SimpleNamespace(generation_config=generation, config=described.config), tokenizer=described.tokenizer)
    return described, sorted(Reader.eos_ids.fget(stand_in))


def prompt_ids(described, document: Path, question: str, max_new_tokens: int) -> list[int]:
    """The token ids `kvcli ask DOCUMENT QUESTION --max-new-tokens N` prefills (query-aware, no --system, the model's context)."""
    from kvcli.ingest import read_documents
    from kvcli.reading import Options
    from kvcli.reading.layout import Layout

    doc = read_documents([str(document)])
    prompt = Layout(described.config, described.tokenizer).prompt(doc.text, question, Options(max_new_tokens=max_new_tokens))
    return prompt.ids[0].tolist()


def cut_document(tokenizer, text: str, prompt_len, tokens: int) -> str:
    """The head of `text`, ended at a line, whose prompt (`prompt_len(head)` tokens) is about `tokens` long."""
    starts = [start for start, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    keep, head = tokens, text
    for _ in range(3):  # the template's tokens and the cut at a line shift the count: correct it twice
        if keep >= len(starts):
            head = text
        else:
            cut = starts[max(1, keep)]
            line_end = text.rfind("\n", 0, cut)
            head = text[: line_end + 1] if line_end > 0 else text[:cut]
        over = prompt_len(head) - tokens
        if abs(over) <= max(8, tokens // 200) or (head is text and over < 0):
            break
        keep -= over
    return head


# --------------------------------------------------------------------------- one run of each


def run_child(command: list[str], env: dict | None = None) -> tuple[str, str, int, int]:
    """(stdout, stderr, exit status, peak RSS in bytes) of one child process, its own ru_maxrss (os.wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return out.read().decode(errors="replace"), err.read().decode(errors="replace"), process.returncode, peak


def run_kvcli(args, document: Path) -> dict:
    command = [args.kvcli_python, "-m", "kvcli", "ask", str(document), args.question, "--json", "--model", args.model,
               "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens), *shlex.split(args.kvcli_args)]
    env = {key: value for key, value in os.environ.items() if key != "KVCLI_THREADS"}  # --threads says it
    out, err, code, peak = run_child(command, env)
    if code != 0:
        raise SystemExit(f"peer_llamacpp: kvcli exited {code}: {err.strip().splitlines()[-1] if err.strip() else '(no message)'}")
    result = json.loads(out.strip().splitlines()[-1])
    stats = result["stats"]
    return {
        "engine": "kvcli", "prompt_tokens": stats["prompt_tokens"], "load_s": stats["load_s"], "prefill_s": stats["prefill_s"],
        "ttft_s": stats["ttft_s"], "decode_tokens": stats["decode_tokens"], "decode_s": stats["decode_s"],
        "peak_rss_bytes": peak, "peak_rss_self_bytes": stats["peak_memory_bytes"], "answer": result["answer"],
        "method": stats["method"], "kv_kept_fraction": stats["kv_kept_fraction"], "read": stats["read"],
        "dtype": stats.get("dtype") or None, "weights": stats.get("weights") or None,  # in kvcli's --json since issue 27
    }


def run_llama(args, job_path: Path, tokenizer) -> dict:
    out, err, code, peak = run_child([args.llama_python, __file__, "--llama-worker", str(job_path)])
    if code != 0:
        raise SystemExit(f"peer_llamacpp: the llama.cpp worker exited {code}: {err.strip().splitlines()[-1] if err.strip() else '(no message)'}")
    row = json.loads(out.strip().splitlines()[-1])
    row.update(engine="llama.cpp", peak_rss_bytes=peak, answer=tokenizer.decode(row["tokens"], skip_special_tokens=True).strip())
    return row


def with_rates(row: dict) -> dict:
    """Add the rates: prefill tokens/s, and decode tokens/s counted as kvcli counts them (the first token comes from the prefill)."""
    row["prefill_tokens_per_s"] = row["prompt_tokens"] / row["prefill_s"] if row["prefill_s"] else None
    steps = row["decode_tokens"] - 1
    row["decode_tokens_per_s"] = steps / row["decode_s"] if steps > 0 and row["decode_s"] > 0 else None
    return row


# --------------------------------------------------------------------------- the GGUF both read


def gguf_path(model: str, workdir: Path) -> Path:
    """The GGUF llama.cpp reads: a `.gguf` path as given, or an embedded model's parts joined and checked against its pinned sha256."""
    from kvcli.models import EMBEDDED, DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    if model in EMBEDDED:
        embedded = EMBEDDED[model]
        joined = workdir / f"{embedded.name}.gguf"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for part in embedded.part_paths():
                with part.open("rb") as source:
                    while chunk := source.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != embedded.sha256:
            raise SystemExit(f"peer_llamacpp: the installed parts of {model} do not match its pinned sha256; reinstall them ({embedded.install})")
        return joined
    path = Path(model).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise SystemExit(f"peer_llamacpp: llama.cpp reads GGUF files: pass --model with an embedded model ({', '.join(EMBEDDED)}) or a .gguf file, not {model!r}")
    return path


def llama_python(given: str | None) -> str:
    """The python that runs the llama.cpp side: --llama-python, else this one if it imports llama_cpp, else the usual venv."""
    candidates = [given] if given else [sys.executable, str(LLAMA_VENV_PYTHON)]
    for python in candidates:
        if Path(python).exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return python
    raise SystemExit(f"peer_llamacpp: llama_cpp is not importable by {' or '.join(candidates)}: {INSTALL_HINT}")


# --------------------------------------------------------------------------- the table


def summarize(rows: list[dict]) -> dict:
    """Medians per engine of each metric, and kvcli's median over llama.cpp's."""
    medians = {}
    for engine in ("kvcli", "llama.cpp"):
        mine = [row for row in rows if row["engine"] == engine]
        medians[engine] = {key: statistics.median(values) if (values := [row[key] for row in mine if row.get(key) is not None]) else None
                           for key in METRICS + ("load_s", "decode_tokens")}
    ratios = {key: medians["kvcli"][key] / medians["llama.cpp"][key] if medians["kvcli"][key] and medians["llama.cpp"][key] else None
              for key in METRICS}
    return {"medians": medians, "ratios": ratios}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict], summary: dict) -> str:
    head = "| run | engine | prompt tokens | prefill tok/s | decode tok/s | first token s | peak RSS GB | new tokens |"
    lines = [head, "|" + " --- |" * 8]

    def line(label: str, engine: str, row: dict) -> str:
        rss = row["peak_rss_bytes"] / 1e9 if row.get("peak_rss_bytes") else None
        return (f"| {label} | {engine} | {_cell(row['prompt_tokens'], ',.0f')} | {_cell(row['prefill_tokens_per_s'], '.1f')} | "
                f"{_cell(row['decode_tokens_per_s'], '.2f')} | {_cell(row['ttft_s'], '.2f')} | {_cell(rss, '.2f')} | {_cell(row['decode_tokens'], '.0f')} |")

    for index, row in enumerate(rows):
        lines.append(line(str(index // 2 + 1), row["engine"], row))
    for engine in ("kvcli", "llama.cpp"):
        lines.append(line("median", engine, summary["medians"][engine]))
    ratios = summary["ratios"]
    lines.append(f"| kvcli / llama.cpp | | {_cell(ratios['prompt_tokens'], '.2f')} | {_cell(ratios['prefill_tokens_per_s'], '.2f')}x | "
                 f"{_cell(ratios['decode_tokens_per_s'], '.2f')}x | {_cell(ratios['ttft_s'], '.2f')}x | {_cell(ratios['peak_rss_bytes'], '.2f')}x | |")
    return "\n".join(lines)


def agreement(kvcli_row: dict, llama_row: dict, tokenizer) -> dict:
    """Whether the two greedy answers agree: the whole text, the first token, and how many characters they share."""
    kv, ll = kvcli_row["answer"], llama_row["answer"]
    shared = next((i for i, (a, b) in enumerate(zip(kv, ll)) if a != b), min(len(kv), len(ll)))
    first = tokenizer.decode(llama_row["tokens"][:1], skip_special_tokens=True).strip() if llama_row["tokens"] else ""
    return {"same_text": kv == ll, "first_token_agrees": bool(first) and kv.startswith(first), "shared_chars": shared,
            "kvcli_answer": kv, "llama_answer": ll}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="an embedded model or a .gguf file: both engines read its GGUF (kvcli converts it as it always does)")
    parser.add_argument("--tokens", type=int, default=6000, help="about how long the prompt is, in the model's tokens (the document is cut at a line)")
    parser.add_argument("--document", type=Path, help="read this file whole instead of the cut samples/haystack.txt")
    parser.add_argument("--question", default=QUESTION, help="asked of the document (the default asks for a long answer, so that decode is timed)")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each engine, alternating kvcli then llama.cpp")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--n-batch", type=int, default=512, help="llama.cpp's prompt batch (n_batch = n_ubatch; llama-cpp-python's default)")
    parser.add_argument("--kvcli-args", default="", help="more `kvcli ask` options, quoted as one string, e.g. \"--dtype float32\" or \"--method full\"")
    parser.add_argument("--kvcli-python", default=sys.executable, help="the python whose kvcli runs (default: this one)")
    parser.add_argument("--llama-python", help=f"a python that imports llama_cpp (default: this one if it does, else {LLAMA_VENV_PYTHON})")
    parser.add_argument("--json", type=Path, help="also write every run, the medians, the ratios and the setup here")
    parser.add_argument("--llama-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.llama_worker:
        print(json.dumps(llama_worker(json.loads(args.llama_worker.read_text()))))
        return
    if args.pairs < 1 or args.threads < 1 or args.max_new_tokens < 1 or args.tokens < 64:
        raise SystemExit("peer_llamacpp: --pairs, --threads and --max-new-tokens must be at least 1, --tokens at least 64")
    args.llama_python = llama_python(args.llama_python)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    described, eos_ids = load_text_side(args.model)
    tokenizer = described.tokenizer
    with tempfile.TemporaryDirectory(prefix="peer_llamacpp-") as tmp:
        workdir = Path(tmp)
        document = workdir / "document.txt"
        if args.document:
            document.write_text(args.document.read_text())
        else:
            def measure(text: str) -> int:
                document.write_text(text)
                return len(prompt_ids(described, document, args.question, args.max_new_tokens))

            document.write_text(cut_document(tokenizer, HAYSTACK.read_text(), measure, args.tokens))
        ids = prompt_ids(described, document, args.question, args.max_new_tokens)
        say(f"prompt: {len(ids):,} tokens; joining the GGUF")
        gguf = gguf_path(args.model, workdir)
        job_path = workdir / "job.json"
        job_path.write_text(json.dumps({"gguf": str(gguf), "ids": ids, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
                                        "n_batch": args.n_batch, "eos_ids": eos_ids}))
        rows: list[dict] = []
        for pair in range(args.pairs):
            say(f"pair {pair + 1}/{args.pairs}: kvcli")
            kvcli_row = with_rates(run_kvcli(args, document))
            if kvcli_row["prompt_tokens"] != len(ids):
                raise SystemExit(
                    f"peer_llamacpp: kvcli read a {kvcli_row['prompt_tokens']:,}-token prompt where llama.cpp is fed {len(ids):,}: "
                    f"they would not answer the same prompt (does --kvcli-args change the prompt, e.g. --system or --max-context?)")
            say(f"pair {pair + 1}/{args.pairs}: llama.cpp")
            llama_row = with_rates(run_llama(args, job_path, tokenizer))
            if llama_row["prompt_tokens"] != len(ids):
                raise SystemExit(f"peer_llamacpp: llama.cpp evaluated {llama_row['prompt_tokens']:,} prompt tokens, not the {len(ids):,} it was given")
            rows += [kvcli_row, llama_row]
    summary = summarize(rows)
    agreed = agreement(rows[0], rows[1], tokenizer)
    system_info = rows[1]["system_info"]
    print(f"kvcli against llama.cpp: {args.model}, a {len(ids):,}-token prompt, {args.threads} thread(s), greedy, "
          f"at most {args.max_new_tokens} new tokens; kvcli args: {args.kvcli_args or '(none)'} "
          f"(kvcli read: {rows[0]['method']}, {rows[0]['read']}, KV kept {_cell(rows[0]['kv_kept_fraction'], '.3f')}"
          + (f", dtype {rows[0]['dtype']}" if rows[0]['dtype'] else "")
          + (f", weights {rows[0]['weights']}" if rows[0]['weights'] not in (None, rows[0]['dtype']) else "") + ")")
    print(f"llama-cpp-python {rows[1]['llama_cpp_python']}, n_batch {args.n_batch}; peak RSS: each child's ru_maxrss (os.wait4), from the end of its load\n")
    print(table(rows, summary))
    print(f"\nanswers (first pair): {'the same text' if agreed['same_text'] else 'differ'}; first token "
          f"{'agrees' if agreed['first_token_agrees'] else 'differs'}; {agreed['shared_chars']} characters in common from the start")
    if args.json:
        setup = {key: value for key, value in vars(args).items() if key != "llama_worker"}
        setup = {key: str(value) if isinstance(value, Path) else value for key, value in setup.items()}
        args.json.write_text(json.dumps({"setup": setup, "prompt_tokens": len(ids), "eos_ids": eos_ids, "llama_system_info": system_info,
                                         "runs": [{k: v for k, v in row.items() if k not in ("tokens", "system_info")} for row in rows],
                                         **summary, "agreement": agreed}, indent=1))


if __name__ == "__main__":
    main()
