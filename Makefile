# `make demo` and `make test` work on a fresh clone: they create .venv and install what they need.
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch is installed first where none is present; a bare `torch` requirement would pull a CUDA build of several GB.
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-slow install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test,tensorboard,app,feedback]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m alignkit demo

test: install
	$(PY) -m pytest -q tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) runs .pytest_cache
