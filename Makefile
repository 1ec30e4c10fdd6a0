PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

VENV ?= .venv
GLUE_DIR ?= ../shared/data/glue

.PHONY: install demo ci test test-slow quality style bench bench-step bench-glue

# A virtualenv with the CPU build of torch first (so nothing pulls a CUDA build), then the package.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install torch==2.13.0
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python examples/glue.py --task_name sst2 --glue_dir $(GLUE_DIR) --method neq \
		--max_train_samples 2000 --max_eval_samples 872 --num_train_epochs 1 --check_every 10 \
		--per_device_train_batch_size 32 --max_seq_length 64 --output_dir runs/demo \
		--report_to none

ci:
	CI=true bash .ci/run

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
