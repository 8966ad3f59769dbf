# Two commands are the whole set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/local.yaml
ARGS   ?=

.PHONY: run base ablation test test-fast venv constraints benchmarks gpu-wheels clean

# The venv is rebuilt when the constraints or the package metadata change.
$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cafe run --config $(CONFIG) $(ARGS)

# The tiny pretrained base (LM loss only, configs/base.yaml) with its model card, into models/shapes-base.
base: $(STAMP)
	$(VENV)/bin/cafe pretrain --config configs/base.yaml --out models/shapes-base $(ARGS)

# The a_lm:a_con ablation (the paper's Table 7) and an LM-only fine-tuning of the base, compared with it.
ablation: $(STAMP)
	$(VENV)/bin/cafe ablation --config $(CONFIG) $(ARGS)

# The whole suite on one worker per core (at most 4: the end-to-end run is the critical path).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 $(ARGS)

# The fast tier: every module's unit tests, no end-to-end runs (under 3 minutes on 2 cores).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m "not slow" $(ARGS)

benchmarks: $(STAMP)
	for b in convert train_step contrastive_batch node_cache retrieval export pipeline_overhead; do $(PY) benchmarks/$$b.py || exit 1; done

# The wheels the GPU acceptance check installs offline on a GPU machine (benchmarks/gpu_check.py --install):
# everything it imports besides the machine's own torch, at constraints.txt's pins, for CPython $(GPU_PYTHON)
# on manylinux x86_64, slimmed to under 60 MB (deepspeed, an sdist, is built here into a wheel).
GPU_PYTHON ?= 3.11
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_check.py --wheels gpu-wheels --python-version $(GPU_PYTHON)

# Re-resolve exact versions after changing dependencies (then commit constraints.txt).
constraints:
	rm -rf /tmp/cafe-constraints && $(PYTHON) -m venv /tmp/cafe-constraints
	/tmp/cafe-constraints/bin/pip install --quiet torch==2.13.0 -e '.[test]'
	( head -2 constraints.txt; /tmp/cafe-constraints/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/' ) > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
