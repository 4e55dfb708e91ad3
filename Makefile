# The two commands of the README: `make demo` (the whole job) and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint clean

setup:
	./scripts/setup.sh

demo: setup
	./scripts/demo.sh

test: setup
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check .

clean:
	rm -rf runs cache build .pytest_cache
