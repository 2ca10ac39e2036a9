# One-command set-up: a local virtual environment with the pinned CPU torch, then the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

# setup.py compiles the optional C hot loops, so C edits re-run the install too.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard src/scratchlm/*/*.c)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull gigabytes of CUDA wheels here.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job: every stage on the embedded default data (builtin:python-stdlib), ~15 minutes on
# 2 CPU cores; re-running skips finished stages. The report card is runs/speedrun/report.md.
run: setup
	$(VENV)/bin/scratchlm speedrun --out runs/speedrun

test: setup
	$(PY) -m pytest -q

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
