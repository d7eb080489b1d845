# Two entry points on a fresh clone: `make demo` and `make test`. Both set up .venv first.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flopwise-setup
PYTEST_ARGS ?=

export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup model demo test test-fast bench-overhead clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup.sh tools/vllm-alias/pyproject.toml
	bash tools/setup.sh
	@touch $@

# Dequantize the embedded SmolLM2-135M-Instruct once into the cache dir (skipped when present).
model: setup
	@$(BIN)/flopwise model

demo: model
	$(BIN)/flopwise demo

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-overhead: model
	$(BIN)/flopwise bench overhead

clean:
	rm -rf $(VENV) build *.egg-info
