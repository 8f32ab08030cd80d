# Front door: `make <stage> KNOB=value` runs `invoke <stage> --knob value`.
# Stage names and knobs come from the tables in backends/ (python3 -m backends.catalog),
# so this file never lists them. `make help` explains everything.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# Knob values are data, never make code: every user value is read with $(value ...) and
# is unexported (make would expand a command-line value while exporting it to a recipe), so
# ARGS='$(shell ...)' reaches the stage as text; the flags carry the knobs to invoke.
knob = $(value $(1))

# What the venv needs: launching on docker or Modal needs only their SDK (never torch);
# running stages here needs the training stack, and the tests need everything (test, lint
# and bench always install the full set, whatever BACKEND or EXTRAS the shell exports).
ifeq ($(call knob,BACKEND),modal)
EXTRAS ?= modal
else ifeq ($(call knob,BACKEND),docker)
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
REMOTE_PATH := $(value PATH)
override PATH := $(CURDIR)/$(VENV)/bin:/usr/local/bin:/usr/bin:/bin
endif

STAGES := $(shell $(PYTHON) -m backends.catalog stages)
KNOB_SPECS := $(shell $(PYTHON) -m backends.catalog make-flags)
ifeq ($(STAGES),)
$(error could not read the stage table: is '$(PYTHON)' (Python >= 3.10) on PATH?)
endif

# A knob given on the command line or in the environment becomes an invoke flag:
# DEPTH=12 -> --depth='12'; DRY_RUN=1 -> --dry-run. Single quotes in values are escaped.
# A knob given empty on the command line (PRESET=) or a switch that is neither on nor off
# (RL=maybe) stops here with one line, before anything runs.
quote = '$(subst ','\'',$(1))'
spec_var = $(word 1,$(subst =, ,$(1)))
spec_flag = $(word 2,$(subst =, ,$(1)))
spec_kind = $(word 3,$(subst =, ,$(1)))
KNOB_VARS := $(foreach spec,$(KNOB_SPECS),$(call spec_var,$(spec)))
unexport $(KNOB_VARS) REMOTE_PATH DEST STAGE OUT IMAGE BUCKET
# The words of backends/knobs.py (SWITCH_ON/SWITCH_OFF), in the cases make cannot fold.
SWITCH_ON := 1 true yes on True Yes On TRUE YES ON
SWITCH_OFF := 0 false no off False No Off FALSE NO OFF
given = $(and $(filter command line environment override,$(origin $(1))),$(call knob,$(1)))
switch = $(if $(filter 1,$(words $(2))),$(if $(filter $(SWITCH_ON),$(2)),on,$(if $(filter $(SWITCH_OFF),$(2)),off)))
check_switch = $(if $(call switch,$(1),$(call knob,$(1))),,$(error $(1) must be 1 or 0 (on or off), got '$(call knob,$(1))'))
check_empty = $(if $(and $(filter command line,$(origin $(1))),$(if $(call knob,$(1)),,empty)),$(error $(1) is empty: give it a value, or leave it out for the default))
knob_flag = $(call check_empty,$(call spec_var,$(1)))$(if $(call given,$(call spec_var,$(1))),$(if $(filter bool,$(call spec_kind,$(1))),$(call check_switch,$(call spec_var,$(1)))$(if $(filter on,$(call switch,,$(call knob,$(call spec_var,$(1))))),$(call spec_flag,$(1))),$(call spec_flag,$(1))=$(call quote,$(call knob,$(call spec_var,$(1))))))
FLAGS = $(strip $(foreach spec,$(KNOB_SPECS),$(call knob_flag,$(spec))))
# Checked now, when a stage is asked for: a bad knob stops make before the venv set-up.
KNOBS_CHECKED := $(if $(filter $(STAGES) speedrun,$(MAKECMDGOALS)),$(FLAGS))

# Exit codes: GNU make exits 2 whenever a recipe fails, which would make "it broke" (1) and
# "killed" (128+N) look like "you typed it wrong" (2). Two things pass the stage's own code
# through: question mode (-q), in which make exits with a recipe's 1 as its own 1 (recipes
# marked `+`, here $(EXEC), still run in it), and re-raising a signal that ended the stage
# on make itself (143 for SIGTERM). Under `make -n` neither applies: it prints, runs nothing.
ifneq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
EXEC :=
else
override MAKEFLAGS += --question
EXEC := +
endif
# Run a command; a signal that ended it ends make the same way.
# Only the signals that end a process are re-raised (HUP INT QUIT ABRT KILL PIPE TERM); make's
# question mode stays out of the command's environment (a nested make would build nothing).
QUIET_MAKE := env -u MAKEFLAGS -u MFLAGS
# After signalling make, the shell gives make's handler a moment to start, then ends itself by
# the same signal: on SIGTERM make has already stopped it; on SIGINT make waits for it (a wait
# of 5 s held every Ctrl-C'd stage). Ending at once races make's own bookkeeping ("wait: No
# child processes", exit 2).
pass_code = $(QUIET_MAKE) $(1); code=$$?; case $$code in 129|130|131|134|137|141|143) \
	kill -s $$((code - 128)) $$PPID; sleep 0.2; kill -s $$((code - 128)) $$$$;; esac; exit $$code

# The venv's bin/ first, so `python` and `torchrun` in stage commands are the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help setup test browser docker-engine sandbox lint bench bench-engine ablate lock speedrun docker-build docker-shell volume-ls volume-get \
	skypilot-task slurm-script skypilot-parser \
	$(STAGES)

help:
	$(EXEC)@$(PYTHON) -m backends.catalog help

setup: $(STAMP)

# One stamp per set of extras (.installed-train-dev, .installed-modal, ...); each re-installs
# when pyproject.toml changes. torch is pinned in pyproject: pip takes the CPU wheel where
# one is provided locally and the CUDA build from PyPI on a GPU machine.
# The full install (train,dev) holds every other set, so it satisfies them as they are.
FULL_STAMP := $(call stamp_for,train$(comma)dev)
$(VENV)/.installed-%: pyproject.toml
	$(EXEC)@if [ -e $(FULL_STAMP) ] && [ $(FULL_STAMP) -nt pyproject.toml ]; then touch $@; else \
	  echo "[nanochat] setting up $(VENV) with extras [$(subst -,$(comma),$*)] (first time: a few minutes)" \
	  && { test -x $(PY) || $(PYTHON) -m venv $(VENV); } \
	  && $(QUIET_MAKE) $(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(subst -,$(comma),$*)]' \
	  && touch $@; fi

$(STAGES) speedrun: $(STAMP)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke $@ $(FLAGS))

# A launch file for a cluster we do not drive: STAGE (default pretrain), OUT, IMAGE and
# BUCKET are read from the command line only.
cmdline = $(if $(filter command line,$(origin $(1))),--$(2)=$(call quote,$(value $(1))))
skypilot-task slurm-script: $(STAMP)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke $@ $(FLAGS) $(call cmdline,STAGE,stage) $(call cmdline,OUT,out) $(call cmdline,IMAGE,image) $(call cmdline,BUCKET,bucket))

docker-build: $(call stamp_for,docker)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke docker-build)

docker-shell: $(call stamp_for,docker)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke docker-shell $(if $(call knob,BASE_DIR),--base-dir=$(call quote,$(call knob,BASE_DIR))))

volume-ls: $(call stamp_for,modal)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke volume-ls $(if $(REMOTE_PATH),--path=$(call quote,$(REMOTE_PATH))))

volume-get: $(call stamp_for,modal)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke volume-get --path=$(call quote,$(REMOTE_PATH)) \
		$(if $(call knob,DEST),--dest=$(call quote,$(call knob,DEST))))

lock: $(FULL_STAMP)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke lock)

# ARGS reaches pytest only from the command line (make test ARGS='-k tokenizer'): an ARGS the
# shell exports for the stages is no pytest flag.
test: $(FULL_STAMP) browser docker-engine sandbox skypilot-parser
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke test $(if $(filter command line,$(origin ARGS)),--args=$(call quote,$(call knob,ARGS))))

# Debian packages $(2) for the $(1) test, installed when missing (apt-get, as root or
# through sudo); without apt-get the test says why it did not run.
apt_install = if command -v apt-get >/dev/null 2>&1; then \
	  echo "[nanochat] installing Debian's $(2) for the $(1) test (once)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $(2) \
	    >/dev/null || echo "[nanochat] could not install $(2): the $(1) test will say so"; \
	else echo "[nanochat] no apt-get: install $(2) to run the $(1) test"; fi

# The web page is tested in a real browser: Debian's chromium.
browser:
	$(EXEC)@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { $(call apt_install,browser,chromium); }

# BACKEND=docker is tested with a real engine: Debian's docker.io (the test starts dockerd
# when none runs) and debootstrap (for a local stand-in of the CUDA base image).
docker-engine:
	$(EXEC)@{ command -v dockerd >/dev/null 2>&1 || test -x /usr/sbin/dockerd || docker info >/dev/null 2>&1; } \
	  && { command -v debootstrap >/dev/null 2>&1 || test -x /usr/sbin/debootstrap; } \
	  || { $(call apt_install,docker,docker.io debootstrap); }

# The SkyPilot task `make skypilot-task` writes is checked by SkyPilot's own parser
# (sky.Task.from_yaml), from PyPI into a venv of its own: its pins (uvicorn, click) would
# otherwise replace the project's.
SKYPILOT_VENV := .venv-skypilot
skypilot-parser: $(SKYPILOT_VENV)/.installed
$(SKYPILOT_VENV)/.installed:
	$(EXEC)@echo "[nanochat] installing SkyPilot's parser into $(SKYPILOT_VENV) for its test (once)" \
	  && { test -x $(SKYPILOT_VENV)/bin/python || $(PYTHON) -m venv $(SKYPILOT_VENV); } \
	  && $(QUIET_MAKE) $(SKYPILOT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'skypilot>=0.14,<0.15' \
	  && touch $@

# Model-written code (HumanEval) runs in a bubblewrap sandbox where the machine has one
# (nanochat/inference/sandbox.py); the tests run it under both layers.
sandbox:
	$(EXEC)@command -v bwrap >/dev/null 2>&1 || { $(call apt_install,sandbox,bubblewrap); }

lint: $(FULL_STAMP)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke lint)

# The bench tools take BASE_DIR and DRY_RUN like the stages (DRY_RUN prints the command).
TOOL_FLAGS = $(if $(call given,BASE_DIR),--base-dir=$(call quote,$(call knob,BASE_DIR))) $(if $(call given,DRY_RUN),$(call check_switch,DRY_RUN)$(if $(filter on,$(call switch,,$(call knob,DRY_RUN))),--dry-run))

bench: $(FULL_STAMP)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke bench $(TOOL_FLAGS) $(if $(filter command line,$(origin ARGS)),--args=$(call quote,$(call knob,ARGS))))

bench-engine: $(FULL_STAMP)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke bench-engine $(TOOL_FLAGS) $(if $(filter command line,$(origin ARGS)),--args=$(call quote,$(call knob,ARGS))))

ablate: $(FULL_STAMP)
	$(EXEC)@$(call pass_code,$(VENV)/bin/invoke ablate $(TOOL_FLAGS) $(if $(filter command line,$(origin ARGS)),--args=$(call quote,$(call knob,ARGS))))

Makefile pyproject.toml: ;

%:
	$(error unknown target '$@': run 'make help' for the stages and knobs)
