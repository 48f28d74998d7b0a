# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv (when missing, or when pyproject.toml changed) and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every Flower process: no runtime dependency installs (else uv downloads GBs), no telemetry, state kept here.
FLWR_ENV := FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
	FLWR_HOME=$(CURDIR)/.flwr RAY_TMPDIR=$(CURDIR)/.flwr/ray RAY_USAGE_STATS_ENABLED=0 PATH=$(CURDIR)/$(BIN):$$PATH

.PHONY: demo test flwr-run lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedfuse simulate configs/quickstart.yaml

# pytest exits 5 when it collects no test: for this suite that is a breakage, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

# The same app through `flwr run .` and Flower's own local SuperLink (needs data: run `make demo` once).
# flwr leaves that SuperLink running detached; it is stopped here by its pid.
flwr-run: $(STAMP)
	mkdir -p .flwr/ray
	$(FLWR_ENV) $(BIN)/flwr run . local --stream \
		--federation-config "num-supernodes=3 client-resources-num-cpus=1"; rc=$$?; \
	pid=$$(pgrep -f "flower-superlink.*--port 39091" | head -n 1); \
	if [ -n "$$pid" ]; then kill -- -$$pid 2>/dev/null || kill $$pid; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check server client shared simulations tests

clean:
	rm -rf runs .flwr
