# nvila developer entry points.
#   make demo      set up .venv with the package alone (if needed) and run the demo on the bundled model
#   make test      set up .venv with every extra (if needed) and run the default test tier (no slow tests)
#   make test-slow same, only the tests marked slow (subprocess CLIs, torchrun, browser, wheel, recipe smoke runs)
#   make test-all  both tiers in one run
#   make bench     run every benchmarks/bench_*.py
#   make synthvila retrain the bundled SynthVILA model (recipes/synthvila/train.py, ~93 min on 2 cores)
#   make ablations the scale-then-compress ablations on it (benchmarks/ablations.py, ~70 min)
#   make clean     remove build/test caches;  make distclean  also removes .venv and outputs
#
# Variables: PYTHON (interpreter used to create .venv), PYTEST_ARGS (extra pytest flags,
# e.g. PYTEST_ARGS='-n 2 -x'), ARGS (extra flags for the demo).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# One stamp per install: the package alone (what `make demo` needs: frame-directory videos need no
# PyAV), or the package with EXTRAS (`make test`), which includes the former.
STAMP_CORE := $(VENV)/.stamp-core
STAMP_FULL := $(VENV)/.stamp-full
# CPU wheel of this version lies on the dev/CI machines' disk. Installed before the project so
# that the project's plain `torch>=...` requirement is already satisfied and pip never resolves
# (and downloads) a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,video,serve,train,eval
# lmms-eval, installed without its declared dependencies when EXTRAS has `eval` (see pyproject.toml's
# eval extra for why); the extra lists what it imports.
LMMS_EVAL_VERSION ?= 0.7.3
PYTEST_ARGS ?=
ARGS ?=

# `pip install -q ARGS`, keeping errors and warnings on stderr but dropping the host pip config's
# harmless "Location 'file:///opt/...' is ignored" noise; pip's exit status is kept.
quiet_pip = $(PIP) install -q $(1) 2>$(VENV)/.pip-stderr; rc=$$?; \
	grep -v "is ignored: it is neither a file nor a directory" $(VENV)/.pip-stderr >&2; \
	rm -f $(VENV)/.pip-stderr; [ $$rc -eq 0 ]

.DEFAULT_GOAL := test
.PHONY: venv venv-core test test-slow test-all demo bench synthvila ablations clean distclean

venv: $(STAMP_FULL)
venv-core: $(STAMP_CORE)

# $(1): the pip requirement for the project, e.g. -e . or -e '.[dev,video]'.
define install_venv
	@if ! $(PY) -c 'import sys' >/dev/null 2>&1; then \
		echo "creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv --clear $(VENV); \
	fi
	@if ! $(PY) -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "$(TORCH_VERSION)")' >/dev/null 2>&1; then \
		echo "installing torch==$(TORCH_VERSION)"; \
		$(call quiet_pip,torch==$(TORCH_VERSION)); \
	fi
	@echo "installing nvila (editable: $(1))"
	@$(call quiet_pip,$(1))
endef

$(STAMP_CORE): pyproject.toml
	$(call install_venv,-e .)
	@touch $@

$(STAMP_FULL): pyproject.toml
	$(call install_venv,-e '.[$(EXTRAS)]')
	@if echo ",$(EXTRAS)," | grep -q ",eval,"; then \
		echo "installing lmms-eval==$(LMMS_EVAL_VERSION) (--no-deps)"; \
		$(call quiet_pip,--no-deps lmms-eval==$(LMMS_EVAL_VERSION)); \
	fi
	@touch $@ $(STAMP_CORE)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

demo: venv-core
	$(PY) -m nvila.demo $(ARGS)

synthvila: venv
	$(PY) recipes/synthvila/train.py --out runs/synthvila --bundle src/nvila/bundled/synthvila $(ARGS)

ablations: venv
	$(PY) benchmarks/ablations.py --base runs/synthvila/stage2g_fine/final --run runs/ablations $(ARGS)

bench: venv
	@found=0; \
	for f in benchmarks/bench_*.py; do \
		[ -e "$$f" ] || continue; \
		found=1; \
		echo "== $$f"; \
		$(PY) "$$f" || exit $$?; \
	done; \
	[ $$found = 1 ] || echo "no benchmarks/bench_*.py scripts yet: nothing to run"

clean:
	rm -rf build dist .pytest_cache src/*.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) out .demo runs
