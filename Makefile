# Front door: `make <stage> KNOB=value` runs `invoke <stage> --knob value`.
# Stage names and knobs come from the tables in backends/ (python3 -m backends.catalog),
# so this file never lists them. `make help` explains everything.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= train,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma := ,

STAGES := $(shell $(PYTHON) -m backends.catalog stages)
KNOB_SPECS := $(shell $(PYTHON) -m backends.catalog make-flags)
ifeq ($(STAGES),)
$(error could not read the stage table: is '$(PYTHON)' (Python >= 3.10) on PATH?)
endif

# A knob given on the command line or in the environment becomes an invoke flag:
# DEPTH=12 -> --depth='12'; DRY_RUN=1 -> --dry-run. Single quotes in values are escaped.
quote = '$(subst ','\'',$(1))'
spec_var = $(word 1,$(subst =, ,$(1)))
spec_flag = $(word 2,$(subst =, ,$(1)))
spec_kind = $(word 3,$(subst =, ,$(1)))
given = $(and $(filter command line environment override,$(origin $(1))),$(value $(1)))
knob_flag = $(if $(call given,$(call spec_var,$(1))),$(if $(filter bool,$(call spec_kind,$(1))),$(if $(filter-out 0 false no,$($(call spec_var,$(1)))),$(call spec_flag,$(1))),$(call spec_flag,$(1))=$(call quote,$($(call spec_var,$(1))))))
FLAGS = $(strip $(foreach spec,$(KNOB_SPECS),$(call knob_flag,$(spec))))

# The venv's bin/ first, so `python` and `torchrun` in stage commands are the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help setup test lint $(STAGES)

help:
	@$(PYTHON) -m backends.catalog help

setup: $(STAMP)

# Re-installs when pyproject.toml changes. torch is pinned in pyproject: pip takes the
# CPU wheel where one is provided locally and the CUDA build from PyPI on a GPU machine.
$(STAMP): pyproject.toml
	@echo "[nanochat] setting up $(VENV) with extras [$(EXTRAS)] (first time: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

$(STAGES): $(STAMP)
	@$(VENV)/bin/invoke $@ $(FLAGS)

test: $(STAMP)
	@$(VENV)/bin/invoke test $(if $(ARGS),--args=$(call quote,$(ARGS)))

lint: $(STAMP)
	@$(VENV)/bin/invoke lint

Makefile pyproject.toml: ;

%:
	$(error unknown target '$@': run 'make help' for the stages and knobs)
