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

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/run_all.py
