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

# Full benchmark (three rounds) and a quick one (one round of short runs); both write
# bench/RESULTS.md. Most of their time goes into waiting for the billing worker to
# settle every job. See bench/run.py --help for the LiteLLM reference and profiling.
bench: venv
	$(BIN)/python bench/run.py

bench-quick: venv
	$(BIN)/python bench/run.py --quick
