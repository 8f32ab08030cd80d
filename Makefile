# Front door: `make <stage> KNOB=value` runs `invoke <stage> --knob value`.
# Stage names and knobs come from the tables in backends/ (python3 -m backends.catalog),
# so this file never lists them. `make help` explains everything.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# What the venv needs: launching on docker or Modal needs only their SDK (never torch);
# running stages here needs the training stack, and the tests need everything (test, lint
# and bench always install the full set, whatever BACKEND or EXTRAS the shell exports).
ifeq ($(BACKEND),modal)
EXTRAS ?= modal
else ifeq ($(BACKEND),docker)
EXTRAS ?= docker
endif
EXTRAS ?= train,dev
PY := $(VENV)/bin/python
comma := ,
stamp_for = $(VENV)/.installed-$(subst $(comma),-,$(1))
STAMP := $(call stamp_for,$(EXTRAS))

# `make volume-get PATH=...` names the remote path PATH: keep it, and give the recipes a
# real search path back.
ifeq ($(origin PATH),command line)
REMOTE_PATH := $(PATH)
override PATH := $(CURDIR)/$(VENV)/bin:/usr/local/bin:/usr/bin:/bin
endif

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

.PHONY: help setup test browser docker-engine lint bench bench-engine lock speedrun docker-build docker-shell volume-ls volume-get \
	$(STAGES)

help:
	@$(PYTHON) -m backends.catalog help

setup: $(STAMP)

# One stamp per set of extras (.installed-train-dev, .installed-modal, ...); each re-installs
# when pyproject.toml changes. torch is pinned in pyproject: pip takes the CPU wheel where
# one is provided locally and the CUDA build from PyPI on a GPU machine.
# The full install (train,dev) holds every other set, so it satisfies them as they are.
FULL_STAMP := $(call stamp_for,train$(comma)dev)
$(VENV)/.installed-%: pyproject.toml
	@if [ -e $(FULL_STAMP) ] && [ $(FULL_STAMP) -nt pyproject.toml ]; then touch $@; else \
	  echo "[nanochat] setting up $(VENV) with extras [$(subst -,$(comma),$*)] (first time: a few minutes)" \
	  && { test -x $(PY) || $(PYTHON) -m venv $(VENV); } \
	  && $(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(subst -,$(comma),$*)]' \
	  && touch $@; fi

$(STAGES) speedrun: $(STAMP)
	@$(VENV)/bin/invoke $@ $(FLAGS)

docker-build: $(call stamp_for,docker)
	@$(VENV)/bin/invoke docker-build

docker-shell: $(call stamp_for,docker)
	@$(VENV)/bin/invoke docker-shell $(if $(BASE_DIR),--base-dir=$(call quote,$(BASE_DIR)))

volume-ls: $(call stamp_for,modal)
	@$(VENV)/bin/invoke volume-ls $(if $(REMOTE_PATH),--path=$(call quote,$(REMOTE_PATH)))

volume-get: $(call stamp_for,modal)
	@$(VENV)/bin/invoke volume-get --path=$(call quote,$(REMOTE_PATH)) \
		$(if $(DEST),--dest=$(call quote,$(DEST)))

lock: $(FULL_STAMP)
	@$(VENV)/bin/invoke lock

# ARGS reaches pytest only from the command line (make test ARGS='-k tokenizer'): an ARGS the
# shell exports for the stages is no pytest flag.
test: $(FULL_STAMP) browser docker-engine
	@$(VENV)/bin/invoke test $(if $(filter command line,$(origin ARGS)),--args=$(call quote,$(ARGS)))

# The web page is tested in a real browser: Debian's chromium, installed when missing
# (apt-get, as root or through sudo). Elsewhere the browser test says why it did not run.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "[nanochat] installing Debian's chromium for the web page test (once)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium \
	      >/dev/null || echo "[nanochat] could not install chromium: the browser test will say so"; \
	  else echo "[nanochat] no apt-get: install Chromium to run the browser test"; fi; }

# BACKEND=docker is tested with a real engine: Debian's docker.io (the test starts dockerd
# when none runs) and debootstrap (for a local stand-in of the CUDA base image), installed
# when missing, like chromium. Elsewhere the docker test says why it did not run.
docker-engine:
	@{ command -v dockerd >/dev/null 2>&1 || test -x /usr/sbin/dockerd || docker info >/dev/null 2>&1; } \
	  && { command -v debootstrap >/dev/null 2>&1 || test -x /usr/sbin/debootstrap; } || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "[nanochat] installing Debian's docker.io and debootstrap for the docker test (once)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends \
	      docker.io debootstrap >/dev/null || echo "[nanochat] could not install them: the docker test will say so"; \
	  else echo "[nanochat] no apt-get: install Docker and debootstrap to run the docker test"; fi; }

lint: $(FULL_STAMP)
	@$(VENV)/bin/invoke lint

bench: $(FULL_STAMP)
	@$(VENV)/bin/invoke bench $(if $(filter command line,$(origin ARGS)),--args=$(call quote,$(ARGS)))

bench-engine: $(FULL_STAMP)
	@$(VENV)/bin/invoke bench-engine $(if $(filter command line,$(origin ARGS)),--args=$(call quote,$(ARGS)))

Makefile pyproject.toml: ;

%:
	$(error unknown target '$@': run 'make help' for the stages and knobs)
