PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0
DEMO    := model.pretrained=false model.size=tiny dataset=breast_cancer strategy.epochs=8 \
           strategy.learning_rate=1e-3 strategy.context_size=256 strategy.query_size=64

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

demo: $(STAMP)  ## train a random-weight tiny TabICL (base-ft, then peft) on a built-in table
	.venv/bin/tabtune train strategy=base-ft $(DEMO)
	.venv/bin/tabtune train strategy=peft $(DEMO) strategy.learning_rate=3e-3

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
