# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv (when missing, or when pyproject.toml changed) and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
.PHONY: demo test test-quick bench flwr-run lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedfuse simulate configs/quickstart.yaml

# pytest exits 5 when it collects no test: for this suite that is a breakage, not a pass.
# Two workers (pytest-xdist), a test file each: the sites train on one thread, so 2 cores halve the wall time.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

# While editing: the tests not marked slow (no Flower process, no federation, nothing trained for long).
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-quick: pytest collected no tests"; fi; exit $$rc

# Every benchmark at its quick size (bench/README.md), then one table of each figure against its target.
bench: $(STAMP)
	$(BIN)/python -m bench.run

# The same app through `flwr run . local --stream` and Flower's own local SuperLink (needs data: run
# `make demo` once). Sets the Flower environment, and stops the SuperLink that flwr leaves running.
flwr-run: $(STAMP)
	$(BIN)/python -m simulations.flower

lint: $(STAMP)
	$(BIN)/ruff check server client shared simulations tests

clean:
	rm -rf runs .flwr
