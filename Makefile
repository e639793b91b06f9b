# Set-up and the two entry points of the README. Every target is idempotent: the
# virtual environment is built once (again only when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_PATHS := src tests scripts benchmarks lambda

.PHONY: all setup run report test lint format clean

all: run

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), \
		f"Python >= 3.11 needed, {sys.executable} is {sys.version.split()[0]}"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { \
		echo "python3-venv is missing: installing it (needs root)"; \
		apt-get update -qq && apt-get install -y -qq python3-venv; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m cai.localaws install-rie --dest $(BIN)
	touch $(STAMP)

setup: $(STAMP)

# README command 1: the whole default workflow, then its HTML report.
run: setup
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --report results/report.html

# README command 2: format and lint checks, then the test suite.
test: setup lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/snakefmt --check Snakefile rules

format: setup
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/snakefmt Snakefile rules

# Remove every output (results/ keeps only its .gitkeep) and Snakemake's metadata.
clean:
	rm -rf .snakemake
	find results -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf {} +
