# Two entry points on a fresh machine: `make demo` and `make test`.
# Everything is installed into $(VENV) from this repository's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Wall-clock budget of `make demo` in minutes (`make demo DEMO_MINUTES=1` for a short run).
DEMO_MINUTES ?= 14
# Device of `make bench` (`make bench BENCH_DEVICE=cuda` on a GPU).
BENCH_DEVICE ?= cpu

.PHONY: install test demo bench lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build from local disk first; the package ranges below accept it.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: install
	$(VENV)/bin/ruff check modeling_segcompass tests examples benchmarks
	$(VENV)/bin/ruff format --check modeling_segcompass tests examples benchmarks

demo: install
	$(PY) -m modeling_segcompass.cli demo --output-dir demo_output --minutes $(DEMO_MINUTES)

bench: install
	$(PY) benchmarks/run_all.py --device $(BENCH_DEVICE)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
