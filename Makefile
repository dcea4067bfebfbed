PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0
DEMO    := dataset=breast_cancer

.PHONY: help install demo test test-all bench-nano lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install tabtune with its dependencies

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build; a bare requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the shipped pretrained nano on a built-in table: zero-shot, then LoRA fine-tuning
	.venv/bin/tabtune train model=nano strategy=inference $(DEMO)
	.venv/bin/tabtune train model=nano strategy=peft $(DEMO)

test: $(STAMP)  ## run the test suite (fast; CI runs this)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## the test suite including slow tests
	$(PY) -m pytest -q -m ''

bench-nano: $(STAMP)  ## nano (inference, base-ft, peft) vs LogisticRegression and HistGradientBoosting
	.venv/bin/tabtune leaderboard

lint: $(STAMP)  ## static checks (undefined names, unused imports, syntax)
	.venv/bin/ruff check --select F,E9 tabtune_cli tests

clean:  ## remove the virtual environment and build outputs
	rm -rf .venv dist build
