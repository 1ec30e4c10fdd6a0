PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test test-slow quality style bench bench-step bench-glue

test:
	$(PYTHON) -m pytest -q tests

test-slow:
	$(PYTHON) -m pytest -q -m slow tests

quality:
	ruff check neq_hf tests examples benchmarks
	ruff format --check neq_hf tests examples benchmarks

style:
	ruff check --fix neq_hf tests examples benchmarks
	ruff format neq_hf tests examples benchmarks

bench: bench-step bench-glue

bench-step:
	$(PYTHON) benchmarks/step_time.py

bench-glue:
	$(PYTHON) benchmarks/glue_compare.py
