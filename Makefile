# Two commands set up everything on a fresh machine:
#   make demo   -> install (first time) and start the inspection station on the bundled sample product
#   make test   -> install (first time) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup demo test lint bench
setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m inspector.cli serve --sample

# Tests run in a random order (pytest-randomly, loaded explicitly so a missing plugin fails loudly),
# so no test can lean on another's leftovers. The seed is printed; `make test SEED=N` replays an order.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
test: setup
	@echo "test order: random, seed $(SEED) (replay: make test SEED=$(SEED))"
	$(PY) -m pytest -q -p randomly --randomly-seed=$(SEED)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/run_all.py
