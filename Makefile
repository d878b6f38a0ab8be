# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use (CPU build of torch pinned: an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0 triton==3.7.1   # triton 3.7.1 is CUDA torch 2.13.0's pin; it imports on CPU
CUTE := nvidia-cutlass-dsl==4.2.1          # compiles our CuTeDSL decode kernel for sm_90a without a GPU

.PHONY: demo test clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_CPU) $(CUTE)
	$(PY) -m pip install -q -e '.[dev,launchers,cute]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mad.run -m +sweep=smoke

test: $(VENV)/.installed
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
