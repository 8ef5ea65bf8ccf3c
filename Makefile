# The two quick-start commands: `make run` (main job) and `make test`.
# Both create .venv and install the project with its test extra on first use; `make test`
# also creates .venv-aot (the project with libtpu, the TPU compiler) for tests/test_aot.py:
# libtpu stays out of .venv, where every process start would probe for a TPU.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
AOT_BIN := .venv-aot/bin
# pytest-xdist workers for `make test`: one per core, at most 4 (each holds a few GiB).
TEST_WORKERS ?= auto

.PHONY: run test lint install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(AOT_BIN)/.installed: pyproject.toml
	test -x $(AOT_BIN)/python || $(PY) -m venv .venv-aot
	$(AOT_BIN)/python -m pip install -q --upgrade pip
	$(AOT_BIN)/python -m pip install -q -e '.[aot]'
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/python train.py --config configs/synthetic.py --workdir runs/synthetic

# Formatting and lint (configured in pyproject.toml): `ruff format .` fixes the format.
lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint $(BIN)/.installed $(AOT_BIN)/.installed
	PSPNET_AOT_PYTHON=$(CURDIR)/$(AOT_BIN)/python $(BIN)/python -m pytest -q -rs \
	  -n $(TEST_WORKERS) --maxprocesses=4 --dist loadgroup tests

clean:
	rm -rf $(VENV) .venv-aot runs
