# Set-up and the two entry points of the README: `make demo` (the main job) and `make test`.
# torch is installed first, pinned (the CPU wheel on these machines); pip must never resolve an
# unpinned torch here, which would pull gigabytes of CUDA packages. constraints.txt pins the rest.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup speech-tools demo test lint bench clean

setup: $(STAMP) speech-tools

# espeak-ng (Debian package) speaks the bundled corpus; the demo and the tests synthesise it on first use
# into a cache (~/.cache/hookpoints, or $$HOOKPOINTS_CACHE). CI runs as root; elsewhere apt-get runs via sudo.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# chromium (Debian package) opens the HTML report in the tests, headless.
speech-tools:
	@command -v espeak-ng >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng; }
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/hookpoints demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/recording_overhead.py
	$(BIN)/python bench/team_store.py
	$(BIN)/python bench/speech_recording.py
	$(BIN)/python bench/speech_recording.py --threads 2 --clock wall
	$(BIN)/python bench/hook_cost.py
	$(BIN)/python bench/edit_overhead.py
	$(BIN)/python bench/writer_throughput.py

clean:
	rm -rf $(VENV) demo-store demo-store-plots .pytest_cache
