# ms4local — the two commands a newcomer needs: `make demo` and `make test`.
# llama-cpp-python compiles from source once (3–12 min on 2 cores) with llama.cpp's RPC backend; the
# wheel is kept in ms4local's cache ($(WHEELS)), so later installs (a fresh clone, CI) reuse it
# instead of compiling again. pip's own wheel cache cannot: it is keyed by version, not CMAKE_ARGS.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ms4local-installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
LLAMA_CPP_PYTHON := llama-cpp-python==$(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)

# Every build has llama.cpp's RPC backend (libggml-rpc: `ms4local rpc-server`, `--rpc`).
RPC_CMAKE := -DGGML_RPC=on
CACHE   ?= $(or $(MS4LOCAL_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ms4local)
WHEELS  ?= $(CACHE)/wheels/$(subst ==,-,$(LLAMA_CPP_PYTHON))-cpu-rpc

# pip's wheel cache is keyed by version, not by CMAKE_ARGS, so an install may be handed a cached
# wheel built without RPC. After each install: if libggml-rpc is missing from llama_cpp/lib,
# rebuild llama-cpp-python from source without the cache, with CMAKE_ARGS $(1), and check again.
define ensure_rpc
	@$(PY) -c "import sys; from ms4local.engine.rpc import library_file; sys.exit(library_file() is None)" || { \
	  echo "llama-cpp-python came without libggml-rpc (a cached wheel built without -DGGML_RPC=on): rebuilding it"; \
	  CMAKE_ARGS="$(1)" $(PY) -m pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python \
	    --no-deps '$(LLAMA_CPP_PYTHON)' && \
	  $(PY) -c "import sys; from ms4local.engine.rpc import library_file; f = library_file(); \
	    print('libggml-rpc:', f or 'still missing: is CMAKE_ARGS overridden in the environment?'); sys.exit(f is None)"; }
endef

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --force-reinstall --no-index --no-deps --find-links '$(WHEELS)' \
	  '$(LLAMA_CPP_PYTHON)' 2>/dev/null || { \
	  echo "Compiling $(LLAMA_CPP_PYTHON) with $(RPC_CMAKE) once (3–12 min on 2 cores), kept in $(WHEELS)"; \
	  CMAKE_ARGS="$(RPC_CMAKE)" $(PY) -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
	    -w '$(WHEELS).part.'$$$$ '$(LLAMA_CPP_PYTHON)' && mkdir -p '$(WHEELS)' && \
	  mv '$(WHEELS).part.'$$$$/*.whl '$(WHEELS)/' && rm -rf '$(WHEELS).part.'$$$$ && \
	  $(PY) -m pip install --quiet --force-reinstall --no-index --no-deps --find-links '$(WHEELS)' \
	    '$(LLAMA_CPP_PYTHON)'; }
	CMAKE_ARGS="$(RPC_CMAKE)" $(PY) -m pip install -e '.[test]'
	$(call ensure_rpc,$(RPC_CMAKE))
	touch $(STAMP)

demo: install
	$(VENV)/bin/ms4local demo

test: install
	$(PY) -m pytest

clean:
	rm -rf models/demo .pytest_cache

# GPU builds: recompile the pinned llama-cpp-python with CUDA or Metal (and RPC) into $(VENV) (10–40 min).
# CUDA_ARCH=89 (or "86;89") builds for GPUs this machine does not have; check with `ms4local doctor`.
CUDA_ARCH ?=
CUDA_CMAKE = -DGGML_CUDA=on $(RPC_CMAKE)$(if $(CUDA_ARCH), -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH))
METAL_CMAKE = -DGGML_METAL=on $(RPC_CMAKE)

.PHONY: install-cuda install-metal

install-cuda: install
	CMAKE_ARGS="$(CUDA_CMAKE)" \
		$(PY) -m pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python --no-deps '$(LLAMA_CPP_PYTHON)'
	$(call ensure_rpc,$(CUDA_CMAKE))

install-metal: install
	CMAKE_ARGS="$(METAL_CMAKE)" \
		$(PY) -m pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python --no-deps '$(LLAMA_CPP_PYTHON)'
	$(call ensure_rpc,$(METAL_CMAKE))

# One-pass quantization vs BF16 GGUF + llama_model_quantize on a Mistral-Small-4-shaped checkpoint
# (~6 GB source, ~10 GB BF16 file in a temp dir; ~15 min on 2 cores). Writes bench/results/quantize.md.
# BENCH_ARGS="--layers 2 --workdir /big/disk" for more; see `$(PY) bench/quantize_bench.py --help`.
BENCH_ARGS ?=

.PHONY: bench-quantize

bench-quantize: install
	$(PY) bench/quantize_bench.py $(BENCH_ARGS)

# Engine vs raw llama-cpp-python (prefill/decode t/s on one GGUF) and KV reuse on turn 5 of a chat
# (a few minutes on 2 cores). Writes bench/results/chat.md.
.PHONY: bench-chat

bench-chat: install
	$(PY) bench/chat_bench.py

# Prefill and decode t/s of one generated GGUF local vs one and two loopback rpc-servers: the cost of
# llama.cpp's RPC protocol (a few minutes on 2 cores). Writes bench/results/rpc.md.
.PHONY: bench-rpc

bench-rpc: install
	$(PY) bench/rpc_bench.py

# Every quant type of a generated Mistral-Small-4-shaped checkpoint (~70 M parameters): size and KL
# divergence vs F32 with `ms4local eval`'s code (a few minutes on 2 cores; needs matplotlib, the `bench`
# extra). Writes bench/results/README.md (with the other benchmarks' tables) and the size-vs-KLD PNG.
EVAL_BENCH_ARGS ?=

.PHONY: bench-eval bench

bench-eval: install
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/eval_bench.py $(EVAL_BENCH_ARGS)

# All benchmarks; bench-eval last, so that its README collects the others' results.
bench: bench-quantize bench-chat bench-server bench-tokenizer bench-eval

# `ms4local serve` under 1, 4 and 8 concurrent streaming clients, --parallel 1 and 8, on a generated
# GGUF (a few minutes on 2 cores). Writes bench/results/server.md.
.PHONY: bench-server

bench-server: install
	$(PY) bench/server_bench.py

# ms4local's own tekken tokenizer vs llama.cpp's llama_tokenize on 1 MB of mixed-script text, plus
# the tokenizer's build time and 1 MB single words (a minute or two on 2 cores). Writes
# bench/results/tokenizer.md.
.PHONY: bench-tokenizer

bench-tokenizer: install
	$(PY) bench/tokenizer_bench.py

# ms4local's own chat template (embedded in GGUFs made from checkpoints without one) in llama.cpp's
# llama-server: builds llama-server once from the llama.cpp that llama-cpp-python vendors (cmake +
# ninja, CPU; 10–60 min on 2 cores, cached in ~/.cache/ms4local/llamacpp-<version>/), then checks
# that it loads the template and that /apply-template + /tokenize give mistral-common's ids for each
# conversation. Writes bench/results/compat.md; exit 1 on any mismatch or refusal.
.PHONY: compat

compat: install
	$(PY) bench/compat.py

# `ms4local serve` vs `llama-server`, the engine vs `llama-bench` (prefill and decode at depth 512)
# and `chat --json` vs `llama-bench`, on one generated Q8_0 GGUF with the same threads, context and
# --parallel (a/b interleaved, medians; ~10 min on 2 cores after building llama-server and
# llama-bench once, as `make compat` does). Writes bench/results/llamacpp.md.
# LLAMACPP_BENCH_ARGS=--quick for a ~3 minute check.
LLAMACPP_BENCH_ARGS ?=

.PHONY: bench-llamacpp

bench-llamacpp: install
	$(PY) bench/llamacpp_bench.py $(LLAMACPP_BENCH_ARGS)
