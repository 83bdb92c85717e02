# One virtual environment, two entry points: `make bench` (the main job) and `make test`.
# TORCH picks the PyTorch build; the default is the CPU wheel that runs everywhere. On a GPU machine
# install your CUDA build of torch into the venv first (or set TORCH), and the rest follows.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SUITE ?= docvqa

.PHONY: install bench smoke test pretrain clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(PY) run_bench.py --suite $(SUITE)

smoke: install
	$(PY) run_bench.py --suite $(SUITE) --preset smoke

test: install
	$(PY) -m pytest -q

pretrain: install
	$(PY) -m bench.pretrain

clean:
	rm -rf results/runs .pytest_cache
