# ms4local — the two commands a newcomer needs: `make demo` and `make test`.
# llama-cpp-python compiles from source once (3–12 min on 2 cores); pip's wheel cache keeps the
# built wheel, so later installs (a fresh clone, CI) reuse it instead of compiling again.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ms4local-installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/ms4local demo

test: install
	$(PY) -m pytest

clean:
	rm -rf models/demo .pytest_cache
