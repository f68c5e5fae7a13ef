# Two commands do everything on a fresh machine:
#   make train   - install (once) and train the embedded default on this machine
#   make test    - install (once) and run the test suite
# Installs go into .venv inside the checkout; torch is pinned to the CPU build first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test`: two, one per core of the 2-core CI machine. Whole test
# files go to one worker (--dist loadfile), so a module's fixtures are built once.
TEST_JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

.PHONY: setup test test-unit test-distributed train clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip install --quiet torch==2.13.0
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) tests/unit

test-distributed: setup
	$(PYTEST) tests/distributed

train: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed pretrain_mesh.py --ds_config examples/zero2.json

clean:
	rm -rf $(VENV)
