# The two quick-start commands: `make run` (main job) and `make test`.
# Both create .venv and install the project with its test extra on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/python train.py --config configs/synthetic.py --workdir runs/synthetic

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -rs tests

clean:
	rm -rf $(VENV) runs
