# The two commands of the README:
#   make quickstart   set up .venv and run the quick start (teleport demo)
#   make test         set up .venv and run the linter and the whole test suite
# Everything is installed into ./.venv; nothing outside the checkout is touched
# (but for Debian's PostgreSQL server, which .ci/run installs when initdb is missing).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
DEV     := $(VENV)/.dev-installed

.PHONY: quickstart test lint bench schemas clean

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "teleport-db needs Python 3.11 or newer, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

# The product alone (what the quick start needs) ...
$(RUNTIME): pyproject.toml $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	@touch $@

# ... and what the tests need on top.
$(DEV): pyproject.toml $(RUNTIME)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

quickstart: $(RUNTIME)
	$(BIN)/teleport demo

test: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/tctl lint policies/

bench: $(DEV)
	@echo "benchmarks: $(BIN)/python -m bench.<name>  (ls bench/)"

schemas: $(RUNTIME)
	$(BIN)/python -m schemas.jsonschema --write

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
