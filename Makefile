# The README's two commands:  `make study` (set up + run the main job)  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup study test
setup:
	VENV=$(VENV) bash scripts/setup.sh

study: setup
	$(BIN)/pnnh study --preset quick --out runs/study-quick

test:
	VENV=$(VENV) WITH_BROWSER=1 bash scripts/setup.sh
	$(BIN)/python -m pytest -q
