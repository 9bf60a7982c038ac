# The README's two commands:  `make study` (set up + run the main job)  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup study test gpu-check gpu-wheels
setup:
	VENV=$(VENV) bash scripts/setup.sh

study: setup
	$(BIN)/pnnh study --preset quick --out runs/study-quick

test:
	VENV=$(VENV) WITH_BROWSER=1 WITH_SLURM=1 bash scripts/setup.sh
	$(BIN)/python -m pytest -q --ignore=tests/train/test_distributed.py
	$(BIN)/python -m pytest -q tests/train/test_distributed.py  # torchrun jobs, in a process of their own

# The GPU check (docs/benchmarks.md): on a CUDA machine, within 8 minutes, into $(GPU_OUT)/gpu_check.{json,md}.
GPU_OUT ?= runs/gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(GPU_OUT)

# Pure-Python wheels the GPU check may miss on a machine without network (copy wheels/ along with the repo).
gpu-wheels:
	mkdir -p wheels && $(BIN)/pip download -q --only-binary=:all: --no-deps --implementation py --platform any \
	  --python-version 3.10 -d wheels click tqdm pytest pluggy iniconfig packaging pygments exceptiongroup tomli
