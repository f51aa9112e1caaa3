# Set-up is part of every target: a fresh clone needs only Python 3.11,
# Redis and (for the PostgreSQL tests) PostgreSQL.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench bench-quick

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

demo: venv
	$(BIN)/broker demo

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check broker workers simulator tests bench
