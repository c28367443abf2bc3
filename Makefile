# gemma-export: `make demo` and `make test` work on a fresh machine (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The lock: exact versions of every distribution the suite passed with, used as pip constraints (`make lock`).
LOCK   := constraints.txt
# make test: pytest-xdist workers (one per core here); each takes whole test files, so an artifact a file
# builds once is built once (session fixtures are per worker: a few tiny ones are built by both).
TEST_WORKERS ?= 2

.PHONY: install lock demo test lint bench bench-gemma3 bench-recurrentgemma bench-embeddinggemma llama-cpp bench-real bench-e2b \
	kernels gpu-check clean

install: $(STAMP)

# torch is pinned to the CPU wheel this workplace ships; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[test]"
# google-deepmind's RecurrentGemma (oracle of tests/models/test_griffin_deepmind.py) pins numpy<2.4 for its JAX half;
# its PyTorch half, the only one the tests import, needs just einops, jaxtyping and sentencepiece (installed
# first, so that pip's check after the --no-deps install does not report the JAX half's pins).
	$(BIN)/python -m pip install --quiet -c $(LOCK) "einops<1" "jaxtyping<1" "sentencepiece>=0.2.0"
	$(BIN)/python -m pip install --quiet -c $(LOCK) --no-deps "recurrentgemma==1.0.1"
	touch $(STAMP)

# Rewrite the lock from what .venv has now (after a deliberate upgrade that the suite passed with).
lock: install
	{ sed -n '1,2p' $(LOCK); $(BIN)/python -m pip freeze --exclude-editable | grep -v '^gemma.export'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

demo: install
	$(BIN)/gemma-export demo --out build/demo

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check gemma_export tests
	$(BIN)/ruff format --check gemma_export tests

# Benchmarks are not tests: they take long and print tables (README, "Command line"); each also writes its JSON
# under build/bench/. `make bench` runs all three; `make bench-gemma3` only the CPU-speed comparison.
# bench-gemma3: a Gemma-3-270M-shaped random checkpoint, ours vs onnxruntime-genai's builder vs transformers
# eager, same run, prompts 128 and 1024, 128 new tokens, 2 threads, median of 3; fp32, then int4 when
# `gemma-export build` offers --quant (onnxruntime-genai's model is then built at int4 with our block size).
BENCH_THREADS ?= 2
BENCH_REPEAT  ?= 3
BENCH_GEMMA3  ?= gemma-3-270m
# The artifact is rebuilt every time (the build's peak RSS is one of the figures, and the artifact must be the
# current code's); BENCH_REBUILD= reuses the one under build/bench/.
BENCH_REBUILD ?= --rebuild
BENCH_GEMMA3_ARGS = --random $(BENCH_GEMMA3) --prompt-tokens 128,1024 --new-tokens 128 --threads $(BENCH_THREADS) \
	--repeat $(BENCH_REPEAT) $(BENCH_REBUILD)
# Full-depth 2B models need ~2x their fp32 weights in memory and hours of decode on 2 cores; BENCH_LAYERS keeps
# the first N layers at full width (RecurrentGemma: 3 = one recurrent, recurrent, attention cycle). Set it
# empty for full depth.
BENCH_LAYERS ?= 3
bench: bench-gemma3 bench-recurrentgemma bench-embeddinggemma

bench-gemma3: install
	$(BIN)/gemma-export bench $(BENCH_GEMMA3_ARGS) --json-out build/bench/$(BENCH_GEMMA3)-fp32.json
	$(BIN)/gemma-export bench $(BENCH_GEMMA3_ARGS) --quant int4 --json-out build/bench/$(BENCH_GEMMA3)-int4.json

bench-recurrentgemma: install
	$(BIN)/gemma-export bench --random recurrentgemma-2b $(if $(BENCH_LAYERS),--layers $(BENCH_LAYERS)) \
		--new-tokens 256,2048,8192 --json-out build/bench/recurrentgemma-2b.json

bench-embeddinggemma: install
	$(BIN)/gemma-export bench --random embeddinggemma-300m --json-out build/bench/embeddinggemma-300m.json

# llama.cpp's llama-bench, llama-perplexity and llama-quantize, built once (about 5 min on 2 cores) from the
# llama.cpp that the pinned llama-cpp-python sdist vendors, into ~/.cache/gemma-export/llama.cpp-VERSION-RECIPE/bin
# (gemma_export/bench/llamacpp.py; GEMMA_EXPORT_LLAMA_CPP=DIR uses tools built elsewhere instead).
llama-cpp: install
	$(BIN)/python -m gemma_export.bench.llamacpp

# bench-real: the real google/gemma-3-270m (gemma_export/dev/real_checkpoint.py: its Q4_K_M GGUF, fetched, and the
# HF float32 folder converted from it), our artifact built from that folder vs transformers, onnxruntime-genai's
# builder and llama.cpp, same run, prompts 128 and 1024, 128 new tokens, 2 threads, median of 3: our fp32
# artifact beside llama.cpp on an F32 GGUF of the same tensors (llama-quantize), then our int4 artifact beside
# llama.cpp on the Q4_K_M GGUF itself. The artifacts are rebuilt each time (under build/real/).
BENCH_REAL_ARGS = --prompt-tokens 128,1024 --new-tokens 128 --threads $(BENCH_THREADS) --repeat $(BENCH_REPEAT)
bench-real: install llama-cpp
	set -e; \
	hf=$$($(BIN)/python -m gemma_export.dev.real_checkpoint --print-hf-folder); \
	gguf=$$($(BIN)/python -m gemma_export.dev.real_checkpoint --print-gguf); \
	f32=$$($(BIN)/python -m gemma_export.bench.llamacpp --f32 "$$gguf"); \
	$(BIN)/gemma-export build "$$hf" -o build/real/artifact --force; \
	$(BIN)/gemma-export bench build/real/artifact --checkpoint "$$hf" --gguf "$$f32" $(BENCH_REAL_ARGS) \
		--workdir build/bench --json-out build/bench/real-gemma-3-270m-fp32.json; \
	$(BIN)/gemma-export build "$$hf" -o build/real/artifact-int4 --quant int4 --force; \
	$(BIN)/gemma-export bench build/real/artifact-int4 --checkpoint "$$hf" --gguf "$$gguf" $(BENCH_REAL_ARGS) \
		--workdir build/bench --json-out build/bench/real-gemma-3-270m-int4.json

# bench-e2b: the Gemma 4 E2B shape (no real Gemma 4 weights are reachable here): a random fp32 checkpoint of the
# published config (18 GB, written once under build/bench/gemma-4-e2b/), the same weights beside Gemma 3's
# 262,144-token tokenizer (gemma_export/dev/real_vocab.py: llama.cpp's converter cuts the embedding to the
# tokenizer), llama.cpp's Q4_K_M of it (convert_hf_to_gguf.py + llama-quantize, cached), our `--quant int4`
# build (round-to-nearest; the gate is recorded, not enforced: random weights have no meaningful top-1), then
# both side by side, as bench-real.
# onnxruntime-genai 0.18's builder cannot build Gemma 4 (README "Gemma 4"). ~1 h on 2 cores, 24 GB of memory.
E2B = build/bench/gemma-4-e2b
bench-e2b: install llama-cpp
	set -e; \
	$(BIN)/python -m gemma_export.dev.random_checkpoint gemma-4-e2b $(E2B)/random; \
	$(BIN)/python -m gemma_export.dev.real_vocab $(E2B)/random $(E2B)/random-262k; \
	gguf=$$($(BIN)/python -m gemma_export.bench.llamacpp --from-hf $(E2B)/random-262k --type Q4_K_M); \
	$(BIN)/gemma-export build $(E2B)/random-262k -o $(E2B)/artifact-int4 --quant int4 \
		--min-top1 0 --max-kl 100 --force; \
	$(BIN)/gemma-export bench $(E2B)/artifact-int4 --checkpoint $(E2B)/random-262k --gguf "$$gguf" \
		--systems llama.cpp $(BENCH_REAL_ARGS) --workdir build/bench --json-out build/bench/gemma-4-e2b-int4.json

# CUDA kernels of the ai.gemma ops (graphs/*/kernels/, graphs/README.md "Kernels"): one libgemma_kernels.so with
# SASS for sm_80/86/89/90 and compute_90 PTX, built by nvcc (gemma_export/ops/cuda.py holds the one nvcc command;
# it needs only python3, not .venv). No GPU needed to build; 1-2 min on 2 cores.
KERNEL_ARCHS ?= 80,86,89,90
kernels:
	$(PYTHON) -m gemma_export.ops.cuda build --out build/kernels/libgemma_kernels.so --arch $(KERNEL_ARCHS)

# On a machine with an NVIDIA GPU, nvcc and a CUDA build of torch (a lent H100/H200: the machine's own python3,
# not .venv): builds the kernels for that GPU, runs them on the conformance vectors, against the PyTorch
# reference and inside the tiny reference models, and reports their memory bandwidth (gemma_export/dev/gpu_check.py,
# ~2-4 min). Exit 1 on a failed check, 2 without a GPU. GPU_CHECK_ARGS=--dry-run runs the harness on the CPU.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) -m gemma_export.dev.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) .pytest_cache .ruff_cache

# --- C++ and Java runtimes (README "C++ and Java") ------------------------------------------------------------
# Headers only come from outside (cpp/fetch_deps.sh: Debian's libonnxruntime-dev and nlohmann-json, unpacked
# under build/deps, never installed); ONNX Runtime itself is loaded at run time ($GEMMA_ORT_LIBRARY).
CPP_BUILD  := build/cpp
JAVA_BUILD := build/java
JAVA_HOME  ?= $(shell dirname $$(dirname $$(readlink -f $$(command -v javac))))
CPP_JOBS   ?= 2

.PHONY: cpp java bench-cpp
cpp:
	sh cpp/fetch_deps.sh build/deps
	cmake -S cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(CPP_BUILD) -j$(CPP_JOBS)

# The jar (javac, no Maven) and libgemma_runtime_jni.so beside a copy of libgemma_runtime.so (RPATH $ORIGIN).
java: cpp
	rm -rf $(JAVA_BUILD)/classes && mkdir -p $(JAVA_BUILD)/classes
	javac -d $(JAVA_BUILD)/classes $$(find java/src -name '*.java')
	jar --create --file $(JAVA_BUILD)/gemma-runtime.jar -C $(JAVA_BUILD)/classes .
	cp $(CPP_BUILD)/libgemma_runtime.so $(JAVA_BUILD)/
	$(MAKE) $(JAVA_BUILD)/libgemma_runtime_jni.so

$(JAVA_BUILD)/libgemma_runtime_jni.so: java/native/gemma_jni.cpp cpp/include/gemma_runtime.h $(CPP_BUILD)/libgemma_runtime.so
	g++ -std=c++17 -O2 -fPIC -shared -Icpp/include -I$(JAVA_HOME)/include -I$(JAVA_HOME)/include/linux \
		$< -L$(JAVA_BUILD) -lgemma_runtime -Wl,-rpath,'$$ORIGIN' -o $@

# gemma-run's decode speed beside the Python client's, same run (README "C++ and Java"):
# `make bench-cpp BENCH_ARTIFACT=out/gemma-3-270m` (default: the real fp32 build, `gemma-export build HF_FOLDER -o build/real/fp32`)
BENCH_ARTIFACT ?= build/real/fp32
bench-cpp: cpp install
	$(BIN)/python -m gemma_export.dev.native_bench $(BENCH_ARTIFACT) --prompt-tokens 128 --new-tokens 128 \
		--threads $(BENCH_THREADS) --repeat $(BENCH_REPEAT)
