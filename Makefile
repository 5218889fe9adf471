# Two commands for a fresh machine: `make quickstart` (the main job) and `make test` (the suite).
# Both create .venv and install the project (pinned by constraints.txt) into it when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "peftjax needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,plots,interop]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/peftjax quickstart

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/peftjax bench --method lora
	$(BIN)/peftjax bench --method qlora

clean:
	rm -rf $(VENV) runs .pytest_cache
