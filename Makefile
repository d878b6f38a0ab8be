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

# Two pytest-xdist workers of one thread each; loadscope keeps a module on one worker, so a module's shared fixture
# (an interpreter run of every decode case, ~40 s) is built once.
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadscope

clean-venv:
	rm -rf $(VENV)
