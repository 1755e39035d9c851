#!/usr/bin/env bash
# kvcli at real sizes on one CUDA device (docs/bench.md, docs/gpu.md), sized for about 9 minutes
# on an H200 (an estimate: this script has not run on a GPU yet):
#   1. the tests marked `cuda`: live compression equals the replayed capture on CUDA, fused
#      kernels only, flash-attn equals SDPA, a device map over CUDA and the CPU, a GGUF
#      converted in bf16 (each skips what this machine lacks);
#   2. benchmarks/gpu_check.py: random-weight Llama-3-8B, Qwen2.5-7B and Gemma-3-12B at 32K and
#      128K tokens, every method (prefill and decode tokens/s, KV kept and at its peak, CUDA
#      peak), one layer's attention through flash-attn against SDPA, and what fits;
#   3. benchmarks/contention.py: decoding alone and beside busy processes on this machine's
#      cores, torch's default threads against kvcli's --threads (a random SmolLM2-shaped model).
#
#   scripts/gpu_check.sh [--json OUT] [gpu_check.py options]   on a CUDA machine
#   scripts/gpu_check.sh --smoke [--json OUT]                 steps 1-2 on tiny models on the CPU, in a minute or two
#
# With --json OUT the benchmark writes OUT and the contention run OUT's name with .contention.json.
# NO_CONTENTION=1 skips step 3. PYTHON picks the interpreter (default: the repository's .venv if
# there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

smoke=0
json=""
previous=""
for arg in "$@"; do
    [[ "$arg" == "--smoke" ]] && smoke=1
    [[ "$previous" == "--json" ]] && json="$arg"
    previous="$arg"
done

# A failing step does not stop the others: every result is worth having from one device run.
tests=0
if (( smoke )); then
    echo "== cuda tests (all skip without CUDA: this checks that they collect)" >&2
    "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py >&2 || tests=$?
else
    echo "== cuda tests" >&2
    "$PYTHON" -m pytest -q -m cuda >&2 || tests=$?
fi

echo "== benchmark" >&2
bench=0
"$PYTHON" benchmarks/gpu_check.py "$@" || bench=$?

contention=0
if (( ! smoke )) && [[ -z "${NO_CONTENTION:-}" ]]; then
    echo "== CPU threads under contention" >&2
    model_dir="$(mktemp -d)/smollm2-shape"
    cores="$("$PYTHON" -c 'import os; print(len(os.sched_getaffinity(0)))')"
    busy_threads=$(( cores / 2 > 0 ? cores / 2 : 1 ))
    out=()
    [[ -n "$json" ]] && out=(--json "${json%.json}.contention.json")
    "$PYTHON" benchmarks/contention.py --random-model "$model_dir" --prompt-tokens 560 --new-tokens 24 --rounds 1 \
        --busy 0,1,2 --busy-threads "$busy_threads" --settings torch,one,kvcli "${out[@]}" || contention=$?
    rm -rf "$(dirname "$model_dir")"
fi

if (( tests )); then echo "gpu_check: the cuda tests failed (pytest exit $tests)" >&2; exit 1; fi
if (( contention )); then echo "gpu_check: the contention run failed (exit $contention)" >&2; exit 1; fi
exit "$bench"
