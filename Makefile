# Two commands for a fresh machine: `make demo` and `make test`. Both set everything up first.
VENV := .venv
BIN := $(VENV)/bin
MNIST_SHARED := $(abspath ../shared/data/mnist)
ifneq ($(wildcard $(MNIST_SHARED)/t10k-images-idx3-ubyte.gz),)
export FIFTYONE_DIFFUSION_MNIST_DIR ?= $(MNIST_SHARED)
endif
export FIFTYONE_DO_NOT_TRACK ?= true
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/fiftyone-diffusion demo $(DEMO_ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
