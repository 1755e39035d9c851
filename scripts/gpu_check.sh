#!/usr/bin/env bash
# kvcli at real sizes on one CUDA device, in under 8 minutes on an H200 (docs/bench.md):
# the tests marked `cuda`, then full vs dynamickv on a random-weight Llama-3-8B at 32K and 128K tokens.
#
#   scripts/gpu_check.sh [--json OUT]     on a CUDA machine
#   scripts/gpu_check.sh --smoke          the same steps, tiny model on the CPU, in seconds
#
# Other options go to benchmarks/gpu_check.py (see its --help). PYTHON picks the interpreter
# (default: the repository's .venv if there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

smoke=0
for arg in "$@"; do
    [[ "$arg" == "--smoke" ]] && smoke=1
done

# A failing test does not stop the benchmark: both results are worth having from one device run.
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

if (( tests )); then echo "gpu_check: the cuda tests failed (pytest exit $tests)" >&2; exit 1; fi
exit "$bench"
