# Two commands do everything on a fresh machine:
#   make train   install what is missing, then train the default job (W4A4 ResNet on embedded digits)
#   make test    install what is missing, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.distq-installed
CONFIG ?= configs/digits_w4a4.yaml
PYTEST_ARGS ?=

.PHONY: install train test test-slow lint docs clean

install: $(STAMP)

# torch/torchvision are pinned to the releases this project is tested with; the CUDA
# build runs on CPU-only machines too. The last step compiles distq's native kernels (the
# integer engine's bit kernels and the CPU quantizer loops; a few seconds; without a C++
# compiler it says so and both keep their torch kernels).
$(STAMP): pyproject.toml requirements/torch.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/torch.txt
	$(BIN)/python -m pip install -q -e '.[dev,deploy,docs]'
	$(BIN)/python -m distq.native
	touch $@

train: install
	$(BIN)/distq train $(CONFIG)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The user guide (docs/, mkdocs.yml) as a site in site/; a broken link or anchor fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The test suite runs both as well (tests/test_architecture.py).
lint: install
	$(BIN)/ruff check distq tests benchmarks
	PYTHONPATH=. $(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache distq/native/_compiled
