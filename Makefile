# The README's two commands:  `make study` (set up + run the main job)  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup study test
setup:
	VENV=$(VENV) bash scripts/setup.sh

study: setup
	$(BIN)/pnnh compare --models plain20,resnet20,plain56,resnet56 --steps 150 --out runs/compare

test: setup
	$(BIN)/python -m pytest -q
