# Two commands for a newcomer:  `make demo`  and  `make test`.
# Each creates .venv if it is missing: the CPU build of torch 2.13.0 goes in first (an unpinned
# torch would pull a multi-GB CUDA build), then the package with its test extra.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/aimc-device demo --out demo-out

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-out
