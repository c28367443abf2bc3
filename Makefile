# gemma-export: `make demo` and `make test` work on a fresh machine (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch is pinned to the CPU wheel this workplace ships; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
# google-deepmind's RecurrentGemma (oracle of tests/test_griffin_deepmind.py) pins numpy<2.4 for its JAX half;
# its PyTorch half, the only one the tests import, needs just einops, jaxtyping and sentencepiece (installed
# first, so that pip's check after the --no-deps install does not report the JAX half's pins).
	$(BIN)/python -m pip install --quiet "einops<1" "jaxtyping<1" "sentencepiece>=0.2.0"
	$(BIN)/python -m pip install --quiet --no-deps "recurrentgemma==1.0.1"
	touch $(STAMP)

demo: install
	$(BIN)/gemma-export demo --out build/demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check gemma_export tests
	$(BIN)/ruff format --check gemma_export tests

# Benchmarks are not tests: they take long and print tables (README, "Command line"). Full-depth 2B models
# need ~2x their fp32 weights in memory and hours of decode on 2 cores; BENCH_LAYERS keeps the first N layers
# at full width (RecurrentGemma: 3 = one recurrent, recurrent, attention cycle). Set it empty for full depth.
BENCH_LAYERS ?= 3
bench: install
	$(BIN)/gemma-export bench --random recurrentgemma-2b $(if $(BENCH_LAYERS),--layers $(BENCH_LAYERS)) --new-tokens 256,2048,8192
	$(BIN)/gemma-export bench --random embeddinggemma-300m

clean:
	rm -rf build $(VENV) .pytest_cache .ruff_cache
