# Every target sets itself up on a fresh machine: a venv with the project installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AZURITE := node_modules/.bin/azurite-blob
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/blockferry demo

# Azurite (the Azure Storage emulator, from npm) for the Azure cache-store tests; they start it themselves.
$(AZURITE):
	npm install --no-save --no-audit --no-fund azurite@3.35.0

test: $(STAMP) $(AZURITE)
	$(BIN)/python -m pytest -q

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

# borg (Debian's borgbackup) is the peer the bench compares against; without it the report says so.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis node_modules
