# The two set-up commands of a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; override for another platform, e.g. make TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev,bench,text,serve]'
	touch $@

.PHONY: install demo test test-fast lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/ldm demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -ra

# Every test but those marked slow (end-to-end training, subprocesses, DDP, benches): a few minutes on two cores.
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -ra -m "not slow"

# ruff's formatter and linter (pyproject.toml), as CI runs them before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
