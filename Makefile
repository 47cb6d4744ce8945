# Every target creates or reuses .venv and installs what it needs; nothing is done by hand.
# torch==2.13.0 goes in first: on a CPU machine that pin takes the local CPU build, while a
# bare `torch` requirement would pull several GB of CUDA packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# ARGS passes config overrides to the demo, e.g. make demo ARGS="trainer.resources.num_workers=2"
ARGS  ?=

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys demo configs/demo.yaml --baseline configs/demo-sasrec.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python tests/suite.py

clean:
	rm -rf runs .pytest_cache
