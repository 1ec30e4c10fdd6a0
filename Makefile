PYTHON ?= python
export TOKENIZERS_PARALLELISM ?= false

VENV ?= .venv
# The demo's data: SST-2 shipped in this repository (GLUE TSV layout). `make demo GLUE_DIR=` loads nyu-mll/glue from
# the Hub instead (needs the network); any folder in the GLUE layout works too.
GLUE_DIR ?= examples/data/glue
# Offline unless the demo's data come from the Hub; a value set in the environment wins.
DEMO_OFFLINE := $(if $(GLUE_DIR),HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1},)

.PHONY: install install-examples demo demo-data ci test test-slow quality style bench bench-step bench-glue

# A virtualenv with the CPU build of torch first (so nothing pulls a CUDA build), then the package.
$(VENV)/.installed-examples: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install torch==2.13.0
	$(VENV)/bin/python -m pip install -e ".[examples]"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-examples
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $@

install-examples: $(VENV)/.installed-examples

install: $(VENV)/.installed

# Checked before the (minutes-long) install.
demo-data:
	@if [ -n "$(GLUE_DIR)" ] && [ ! -f "$(GLUE_DIR)/SST-2/train.tsv" -o ! -f "$(GLUE_DIR)/SST-2/dev.tsv" ]; then \
		echo "make demo: no SST-2 data in GLUE_DIR=$(GLUE_DIR) (expected SST-2/train.tsv and SST-2/dev.tsv)."; \
		echo "Use the data shipped in examples/data/glue (the default), or GLUE_DIR= to load nyu-mll/glue from the Hub."; \
		exit 1; \
	fi

demo: demo-data install-examples
	$(DEMO_OFFLINE) $(VENV)/bin/python examples/glue.py --task_name sst2 $(if $(GLUE_DIR),--glue_dir $(GLUE_DIR),) \
		--method neq --max_train_samples 2000 --max_eval_samples 872 --num_train_epochs 2 --seed 0 \
		--per_device_train_batch_size 32 --max_seq_length 64 --output_dir runs/demo --report_to none

ci:
	CI=true bash .ci/run

test:
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PYTHON) -m pytest -q tests

test-slow:
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PYTHON) -m pytest -q -m slow tests

quality:
	ruff check neq_hf tests examples benchmarks
	ruff format --check neq_hf tests examples benchmarks

style:
	ruff check --fix neq_hf tests examples benchmarks
	ruff format neq_hf tests examples benchmarks

bench: bench-step bench-glue

bench-step:
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PYTHON) benchmarks/step_time.py

bench-glue:
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PYTHON) benchmarks/glue_compare.py
