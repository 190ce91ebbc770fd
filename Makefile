# Set-up and the two entry points of the README: `make demo` (the main job) and `make test`.
# torch is installed first, pinned (the CPU wheel on these machines); pip must never resolve an
# unpinned torch here, which would pull gigabytes of CUDA packages. constraints.txt pins the rest.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hookpoints demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/recording_overhead.py
	$(BIN)/python bench/team_store.py

clean:
	rm -rf $(VENV) demo-store demo-store-plots .pytest_cache
