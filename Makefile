# The two set-up commands of the README:  `make demo`  and  `make test`.
# Both create .venv from requirements.txt on first use (pinned torch==2.13.0, the CPU
# wheel: an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test test-fast clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') and not torch.version.cuda else 'torch is not the pinned CPU build: ' + torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

# Debian packages for the real Slurm/MPI tests (needs root; idempotent, a no-op when present).
system-deps:
	@if [ -x scripts/install_system_deps.sh ]; then scripts/install_system_deps.sh; fi

demo: install
	$(VENV)/bin/ear-dist demo

# The fast tier first (fail fast), then the slow tier; the world builds start at once in the background.
test: install system-deps
	PY=$(PY) scripts/run_tests.sh

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
