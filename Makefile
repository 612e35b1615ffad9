# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.franca-installed
OUT ?= demo_output

.PHONY: install test test-slow lint format demo benchmark gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(STAMP)
	$(PY) -m demo --output-dir $(OUT)

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py

# One GPU, a few minutes: xFormers/SDPA parity, IN21K ViT-B/L steps (fp16, bf16), compile, GPU augmentation, k-NN.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --json gpu_check.json

clean:
	rm -rf $(VENV) build *.egg-info
