# Set-up and everyday commands. Each target creates .venv and installs what it needs on first use.
#   make test   - install (once), lint, and run the whole test suite
#   make lint   - ruff: lint and format check (pyproject.toml); `make format` rewrites the files
#   make test-fast - the same without the tests marked slow (-m "not slow")
#   make test-portability - the numerical tests on every CPU kernel path (default, avx2, this
#                  machine's) with 1 and 2 compute threads, and a summary of the 6 variants
#   make demo   - install (once), write the demo dataset and its CLIP to demo_data/ (first time: 1-2 min)
#                 and train the CPU demo (3-9 min)
#   make check-examples - validate every example config with --check

PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
# Rewritten whenever the requirements or the package metadata change, so installs run only then.
INSTALLED := $(VENV)/.dalle2-decoder-installed
# Per-test limit, the same as setup.cfg's [tool:pytest] timeout; tests that run a subprocess give
# it at most 600 s, below this, so their own message comes first.
TEST_TIMEOUT ?= 900
PYTEST_ARGS ?=
# Test processes (pytest-xdist): most tests run one torch thread (tests/conftest.py), so a second
# process uses the second core. Each takes whole test files (--dist loadfile), so a file's
# module-scoped fixtures (a SLURM cluster, a trained model) are built once. --no-loadscope-reorder
# keeps the collection order (tests/conftest.py puts the longest files first) instead of xdist's
# default, files with the most tests first, which started the longest files last.
# 0 runs in this process.
TEST_WORKERS ?= 2
# The CUDA-marked tests (tests/test_cuda.py) need a GPU: deselected here, run by bench/gpu_check.sh
# on a GPU machine (`make test PYTEST_MARKERS=` runs everything).
PYTEST_MARKERS ?= not cuda
DEMO_DATA ?= demo_data
# Command-line tools the tests use that are not libraries of the package: the aws CLI (for
# `pipe:aws s3 cp ...` shards). They live in a venv of their own, so their pins (awscli pins one
# botocore release) never fight the package's; only the commands are put on the tests' PATH.
TOOLS_VENV ?= .venv-tools
TOOLS_PATH := $(CURDIR)/$(TOOLS_VENV)/path
TOOLS := $(TOOLS_PATH)/aws

.PHONY: install lint format test test-fast test-portability plain-install-check demo demo-data check-examples

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# torch and torchvision first, pinned (requirements.txt), so nothing else pulls in another build.
$(INSTALLED): $(VENV_PYTHON) requirements.txt setup.cfg setup.py
	$(VENV_PYTHON) -m pip install -r requirements.txt
	$(VENV_PYTHON) -m pip install -e ".[test,clip]"
	touch $(INSTALLED)

$(TOOLS):
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q awscli
	mkdir -p $(TOOLS_PATH)
	ln -sf ../bin/aws $(TOOLS)

install: $(INSTALLED) $(TOOLS)

# Lint first: a finding fails the run in seconds rather than after the suite.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint $(TOOLS)
	PATH="$(TOOLS_PATH):$$PATH" $(VENV_PYTHON) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --timeout=$(TEST_TIMEOUT) -m "$(PYTEST_MARKERS)" $(PYTEST_ARGS)

test-fast: lint $(TOOLS)
	PATH="$(TOOLS_PATH):$$PATH" $(VENV_PYTHON) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --timeout=$(TEST_TIMEOUT) -m "not slow and $(PYTEST_MARKERS)" $(PYTEST_ARGS)

# The numerical tests under each CPU kernel path and thread count (scripts/test_portability.py),
# so that a tolerance that holds on one machine only fails on every machine. PORTABILITY_ARGS
# chooses, e.g. "--variants default:1 --files parity" (what CI adds to `make test`).
PORTABILITY_ARGS ?=
test-portability: $(INSTALLED) $(TOOLS)
	PATH="$(TOOLS_PATH):$$PATH" $(VENV_PYTHON) scripts/test_portability.py --timeout $(TEST_TIMEOUT) $(PORTABILITY_ARGS)

# The plain install path CI also checks: a fresh venv, torch first, then the built wheel alone.
plain-install-check:
	bash scripts/ci_plain_install.sh

# The demo draws its shapes 1.5 times the generator's default size, so that they keep their form at
# the demo's 16px (docs/RECIPE.md). The stamp names the scale: data written with another one (or
# before the scale existed) is written again.
DEMO_SHAPE_SCALE := 1.5
DEMO_STAMP := $(DEMO_DATA)/.shape-scale-$(DEMO_SHAPE_SCALE)

$(DEMO_STAMP): | $(INSTALLED)
	$(VENV_PYTHON) -m dalle2_decoder.data.demo --out $(DEMO_DATA) --shape-scale $(DEMO_SHAPE_SCALE)
	touch $@

# The demo's CLIP (dalle2_decoder/data/demo_clip.py, about a minute): a tiny open_clip model fitted
# to map demo pictures to their embeddings, so the demo's evaluation reports CLIP similarity. Its
# input size is the demo decoder's (example_configs/demo_cpu.json); refitted when the data changes.
DEMO_CLIP := $(DEMO_DATA)/clip/open_clip_config.json

$(DEMO_CLIP): $(DEMO_STAMP)
	$(VENV_PYTHON) -m dalle2_decoder.data.demo_clip --out $(DEMO_DATA)/clip --shape-scale $(DEMO_SHAPE_SCALE) --image-size 16

demo-data: $(DEMO_STAMP) $(DEMO_CLIP)

# Trains the tiny demo decoder on the CPU: metrics, sample grids (PNG) and checkpoints go to
# .tracker-data/demo/ (the config overwrites that folder on each run).
demo: $(INSTALLED) $(DEMO_STAMP) $(DEMO_CLIP)
	$(VENV_PYTHON) train_decoder.py --config_file example_configs/demo_cpu.json

check-examples: $(INSTALLED)
	@for config in example_configs/*.json; do \
		echo "== $$config"; \
		$(VENV_PYTHON) train_decoder.py --config_file $$config --check > /dev/null || exit 1; \
	done
