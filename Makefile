# Two entry points: `make demo` and `make test`. Both create .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/models/small.yaml
BUILD ?= build/small
# Extra `tandem demo` flags, e.g. pinned ports: make demo DEMO_ARGS="--http-port 8000 --grpc-port 8001 --metrics-port 8002"
DEMO_ARGS ?=

.PHONY: venv demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/tandem export --config $(CONFIG) --out $(BUILD)
# repository -> tritonserver -> the tandem ensemble over gRPC -> PNG -> server stopped
	$(BIN)/tandem demo --config $(CONFIG) --artifacts $(BUILD) --out build/demo.png --tokens-out build/demo_tokens.npy $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest

clean:
	rm -rf build model_repository/.staging*
