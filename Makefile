# The two commands a new user needs: `make demo` and `make test` (both set themselves up).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint format reproduce bench clean

setup: $(STAMP) graphviz

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Torch first, pinned: an unpinned torch (or a range resolved by pip) would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[all]"
	@touch $(STAMP)

graphviz:
	@if command -v dot >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing the graphviz system package (dot renderer)"; \
		(apt-get install -y -q graphviz >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q graphviz >/dev/null 2>&1)) \
		|| echo "could not install graphviz; pictures will be written as .dot files"; \
	else \
		echo "graphviz 'dot' not found: install it (e.g. 'sudo apt-get install graphviz' or 'brew install graphviz') to get SVG/PNG pictures; .dot files are written meanwhile"; \
	fi

demo: setup
	$(VENV)/bin/blockfinder analyze examples/tabular_vae.py -o $(DEMO_OUT)/blocks.svg --json $(DEMO_OUT)/blocks.json
	rm -rf $(DEMO_OUT)/train
	$(VENV)/bin/impartial-train examples/tabular_vae.py --compare sum,imtl-g --epochs 3 --out $(DEMO_OUT)/train
	@echo "demo outputs: $(DEMO_OUT)/ (blocks.svg, blocks.json, train/compare.json, train/compare.png)"

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

reproduce: setup
	$(PY) -m examples.reproduce --full --out runs/reproduce

bench: setup
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
