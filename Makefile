# The README's two commands: `make demo` and `make test`. Both set everything up first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.facelens-installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: setup
	id=demo-$$(date +%Y%m%d-%H%M%S) && \
	$(PY) train.py sweep --experiment eyeglasses --p 50 100 --config-overlay configs/demo.yaml --sweep-id $$id \
	  --random-init-probes && \
	$(PY) analyze.py report --runs sweeps/$$id --out reports/$$id --wandb

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) bench/gradcam.py
	$(PY) bench/probing.py
	$(PY) bench/dissection.py

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
