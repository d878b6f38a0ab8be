# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use (CPU build of torch pinned: an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0 triton==3.7.1   # triton 3.7.1 is CUDA torch 2.13.0's pin; it imports on CPU

.PHONY: demo test clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[dev,launchers]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mad.run -m +sweep=smoke

test: $(VENV)/.installed
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
