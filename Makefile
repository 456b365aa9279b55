# pgseg developer commands. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned as a pair (timm and open_clip need torchvision); override for another CUDA build.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -q

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: install test lint bench demo mvpseg-demo mvpseg-plus-demo app clean-venv

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
	$(PY) scripts/benchmark.py all

clean-venv:
	rm -rf $(VENV)

# The CPU demo: synthetic data, 936 training steps under torchrun (2 processes), zero-shot evaluation.
# DEMO_ARGS passes options and training overrides: make demo DEMO_ARGS="train.precision=fp32 train.seed=1"
DEMO_ARGS ?=
demo: install
	$(VENV)/bin/pgseg-demo --out runs/demo --data data/demo $(DEMO_ARGS)

# MVP-SEG on synthetic shapes: prompts learned on 6 seen classes of the frozen demo model (run `make demo` first),
# compared with hand-written templates over all 8 classes (seen and unseen) on held-out images.
mvpseg-demo: install
	test -d runs/demo/train || $(MAKE) demo
	test -f data/mvpseg/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt || \
		$(VENV)/bin/pgseg-synth seg data/mvpseg --layout voc --split train --num-images 2000 --seed 4001
	test -f data/mvpseg/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt || \
		$(VENV)/bin/pgseg-synth seg data/mvpseg --layout voc --split val --num-images 300 --seed 4002
	$(VENV)/bin/pgseg-prompt-train --config configs/mvpseg_synthetic.yaml

# MVP-SEG+ on synthetic shapes (after make demo; learns the prompts first if make mvpseg-demo has not run): a
# DeepLabv3+ student taught by the prompts, then self-trained, two seeds; the four-row table of docs/mvpseg.md.
MVPSEG_PLUS_SEEDS ?= 0 1
mvpseg-plus-demo: install
	test -f runs/mvpseg_synthetic/prompts.pt || $(MAKE) mvpseg-demo
	for seed in $(MVPSEG_PLUS_SEEDS); do \
		$(VENV)/bin/pgseg-transfer --config configs/mvpseg_plus_synthetic.yaml train.seed=$$seed \
			train.output_dir=runs/mvpseg_plus_synthetic/seed$$seed || exit 1; \
	done
	$(VENV)/bin/pgseg-transfer --report $(foreach s,$(MVPSEG_PLUS_SEEDS),runs/mvpseg_plus_synthetic/seed$(s)) \
		> runs/mvpseg_plus_synthetic/table.md
	cat runs/mvpseg_plus_synthetic/table.md

DEMO_CLASSES := circle, square, triangle, star, cross, ring, heart, crescent
DEMO_EXAMPLES := data/demo/eval/test/VOCdevkit/VOC2012/JPEGImages

# The web app on the demo's model (run `make demo` first): http://127.0.0.1:7860
app: install
	$(PY) -c "import gradio" 2>/dev/null || $(PY) -m pip install -q -e '.[app]'
	test -d runs/demo/train || $(MAKE) demo
	$(VENV)/bin/pgseg-app --checkpoint runs/demo/train --short-side 64 --bg-thresh 0.8 \
		--classes "$(DEMO_CLASSES)" $$(test -d $(DEMO_EXAMPLES) && echo --examples $(DEMO_EXAMPLES))
