# pgseg developer commands. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned as a pair (timm and open_clip need torchvision); override for another CUDA build.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -q

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: install test lint bench demo clean-venv

$(VENV)/.pgseg-installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# (Re)point the editable install at this checkout: a venv cached outside the checkout may have served another clone.
install: $(VENV)/.pgseg-installed
	@$(PY) -c "import os, sys, pgseg; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(pgseg.__file__))) != os.getcwd())" 2>/dev/null \
		|| $(PY) -m pip install -q --no-deps -e .

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check pgseg tests scripts

bench: install
	$(PY) scripts/benchmark.py model

clean-venv:
	rm -rf $(VENV)

# The CPU demo: synthetic data, training under torchrun (2 processes) within ~13 minutes, zero-shot evaluation.
demo: install
	$(PY) -m pgseg.demo --out runs/demo --data data/demo
