# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned to the CPU wheel this machine keeps on disk (PIP_FIND_LINKS): the
# capture extra admits any torch>=2.4, and left to itself pip takes a CUDA build (~5 GB).
TORCH ?= torch==2.13.0

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[test,s3,capture]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m repscope.jobs.demo

test: $(STAMP)
	$(BIN)/ruff check repscope store cluster jobs tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check repscope store cluster jobs tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
