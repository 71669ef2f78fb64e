# One entry point for a fresh machine with only Python: `make test` builds .venv and runs
# the suite. TORCH_SPEC is installed first and then pinned, so no dependency can replace it
# (on a CPU box `torch==2.13.0` resolves to the local CPU wheel; on a GPU box pick your build).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: test demo lint install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,train]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m tokenpacker_llava.demo --output_dir outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check tokenpacker_llava tests
	$(BIN)/ruff format --check tokenpacker_llava tests

clean:
	rm -rf $(VENV) .pytest_cache
