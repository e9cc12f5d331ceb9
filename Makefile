# `make demo`: set up .venv if needed and run the main job on the built-in default.
# `make test`: set up .venv if needed and run the whole test suite (what CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit venv clean

venv: $(STAMP)

# torch first (the CPU build; a plain `torch` requirement pulls CUDA packages), then deepspeed
# without build isolation (its build imports torch), then the package with every version locked.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check pip==25.3 setuptools==84.2.1
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ray-unlearn run

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
