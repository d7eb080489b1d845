# Two entry points on a fresh clone: `make demo` and `make test`. Both set up .venv first.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flopwise-setup
PYTEST_ARGS ?=

export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup model demo test test-long lint test-fast bench-overhead bench-early-rejection bench-visual bench-kv bench-kv-decode bench-scale clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup.sh tools/vllm-alias/pyproject.toml
	bash tools/setup.sh
	@touch $@

# Dequantize the embedded SmolLM2-135M-Instruct once into the cache dir (skipped when present).
model: setup
	@$(BIN)/flopwise model

demo: model
	$(BIN)/flopwise demo

# CI's budget: tests marked `long` (a feature's further minutes-long end-to-end cases) run with test-long.
test: setup lint
	$(BIN)/python -m pytest -q -ra --durations=25 -m "not long" $(PYTEST_ARGS)

test-long: setup
	$(BIN)/python -m pytest -q -ra -m long $(PYTEST_ARGS)

# ruff (configured in pyproject.toml: line length 110) lints and checks the formatting of every Python file.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-overhead: model
	$(BIN)/flopwise bench overhead

# The generator fine-tune is cached under $FLOPWISE_CACHE; it is made once (a few minutes on 2 cores).
bench-early-rejection: model
	@test -f "$$($(BIN)/python -c 'from flopwise.reasoning import generator_dir; print(generator_dir())')/config.json" \
		|| $(BIN)/python bench/scripts/finetune_chain_sum.py
	$(BIN)/flopwise bench early-rejection

bench-visual: setup
	@test -f bench/models/tiny-vlm-scenes/config.json || $(BIN)/python bench/scripts/train_tiny_vlm.py
	$(BIN)/flopwise bench visual

bench-kv: model
	$(BIN)/flopwise bench kv

bench-kv-decode: model
	$(BIN)/flopwise bench kv-decode

bench-scale: model
	$(BIN)/flopwise bench scale

clean:
	rm -rf $(VENV) build *.egg-info
