# Two commands set up everything on a fresh machine:
#   make demo   -> install (first time) and start the inspection station on the bundled sample product
#   make test   -> install (first time) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup demo test test-busy lint bench
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

# The same suite on a busy machine, as shared CI runners are: BUSY_BURNERS CPU burners (`yes`) run beside
# it, started here and stopped by the EXIT trap whatever ends the run (pass, failure, Ctrl-C), and
# every test deadline is scaled by INSPECTOR_TEST_SLOWDOWN (tests/conftest.py). `make test-busy SEED=N`
# replays an order.
BUSY_BURNERS ?= 3
BUSY_SLOWDOWN ?= 4
test-busy: setup
	@echo "test order: random, seed $(SEED) (replay: make test-busy SEED=$(SEED)); $(BUSY_BURNERS) CPU burners; INSPECTOR_TEST_SLOWDOWN=$(BUSY_SLOWDOWN)"
	@pids=""; trap 'kill $$pids 2>/dev/null; wait $$pids 2>/dev/null' EXIT; trap 'exit 130' INT TERM HUP; \
	for i in $$(seq $(BUSY_BURNERS)); do yes > /dev/null & pids="$$pids $$!"; done; \
	t0=$$(date +%s); \
	INSPECTOR_TEST_SLOWDOWN=$(BUSY_SLOWDOWN) $(PY) -m pytest -q -p randomly --randomly-seed=$(SEED); rc=$$?; \
	echo "test-busy: exit $$rc in $$(( $$(date +%s) - t0 )) s (seed $(SEED), $(BUSY_BURNERS) burners, slowdown $(BUSY_SLOWDOWN))"; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/run_all.py
