# The two commands of the README. Each creates .venv when missing and (re)installs the
# package when setup.cfg or constraints.txt changed; both are quick when nothing changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed's CPU accelerator (gloo, host tensors) for the demo and the tests, also where there
# are GPUs: the demo is sized for a CPU. gpu-check removes it.
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed's CPU op is compiled once per venv with the venv's own ninja (a shared cache
# compiled by another ninja would be rebuilt, stalling every rank for minutes).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
# The project's own modules are compiled once into __pycache__ (ignored by git): where the
# environment sets PYTHONDONTWRITEBYTECODE=1, as this workplace's does, every rank of every
# launch compiled them anew (~0.1 s of CPU each, and `make test` starts hundreds of ranks).
unexport PYTHONDONTWRITEBYTECODE

# DeepSpeed's setup.py (its PyPI sdist) raises on a set but empty DS_ACCELERATOR, which is what
# gpu-check's `DS_ACCELERATOR :=` exports to the install: there the install runs without it.
NO_EMPTY_ACCELERATOR = $(if $(DS_ACCELERATOR),,env -u DS_ACCELERATOR)

# Part of the install: on the CPU accelerator, compile DeepSpeed's two C++ ops (shared-memory
# collectives, which every DeepSpeed start loads, and CPU Adam for offload) into the venv's
# cache now, instead of inside the first training job (~1-2 minutes each).
BUILD_OPS = $(if $(filter cpu,$(DS_ACCELERATOR)),$(BIN)/python -c "from deepspeed.accelerator import get_accelerator; [get_accelerator().create_op_builder(n).load() for n in ('ShareMemCommBuilder', 'CPUAdamBuilder')]",)

.PHONY: demo test venv clean gpu-check

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(NO_EMPTY_ACCELERATOR) $(BIN)/python -m pip install -q --upgrade pip
	$(NO_EMPTY_ACCELERATOR) $(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BUILD_OPS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dit demo configs/demo.yaml

# Two test processes (pytest-xdist): most tests run one single-threaded process, which left one
# of CI's two cores idle (30.7 minutes one at a time, 19.8 two at a time). Work stealing hands
# each process a contiguous run of tests and moves some only when one runs dry, so a module's
# tests mostly share one process and its module-scoped fixtures (a trained run) are built once.
TEST_PROCESSES ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist worksteal

# The one-command GPU check (README, "GPU check"); options go in GPU_CHECK_ARGS, e.g.
# make gpu-check GPU_CHECK_ARGS="--peak-tflops 989", or with the block layouts side by side:
# make gpu-check GPU_CHECK_ARGS="--layouts plain,compile,flat,compile+flat --profile".
# DS_ACCELERATOR=cpu from the top of this file is removed for it, so DeepSpeed uses the GPU, and
# for the install it may need first: no CPU ops compiled (BUILD_OPS is read when the install runs),
# and the variable unset, not empty (NO_EMPTY_ACCELERATOR).
gpu-check: DS_ACCELERATOR :=
gpu-check: $(STAMP)
	env -u DS_ACCELERATOR $(BIN)/dit bench gpu $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
