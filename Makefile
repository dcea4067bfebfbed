PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: help install demo test test-all bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install tabtune with its dependencies

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build on local disk; a bare requirement would pull CUDA
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## run the main job on a built-in dataset
	.venv/bin/tabtune train dataset=breast_cancer strategy=inference
	.venv/bin/tabtune train dataset=breast_cancer strategy=peft

test: $(STAMP)  ## run the test suite (fast; CI runs this)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## the test suite including slow tests
	$(PY) -m pytest -q -m ''

clean:  ## remove the virtual environment and build outputs
	rm -rf .venv dist build
