# Two entry points for a fresh machine with Python 3.11+ and git:
#   make repro   set up the locked environment, then `dvc repro` the default params.yaml
#   make test    set up the locked environment, then run the test suite (what CI runs)
# GPU machines: `make repro EXTRAS=cuda` installs the CUDA 12 build of jaxlib from the same lock.
#   make cluster-repro [ADDRESS=host:6379] [TARGETS="stage ..."]   the same DAG as Ray tasks (stages/cluster_repro.py):
#                a local Ray instance without ADDRESS, a running Ray cluster with it

PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
EXTRAS ?=
# --compile-bytecode: every stage and worker process imports JAX, MuJoCo, ... from .pyc files instead of compiling
# them from source each time (start-up of an evaluate stage's processes ~2.5 s -> ~0.8 s where bytecode is not
# written at run time, e.g. PYTHONDONTWRITEBYTECODE=1)
SYNC_FLAGS := --frozen --compile-bytecode --python $(PYTHON) $(if $(EXTRAS),--extra $(EXTRAS),)

export MUJOCO_GL ?= egl
export UV_PROJECT_ENVIRONMENT := .venv

.PHONY: setup repro cluster-repro test test-all

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

setup: $(UV)
	$(UV) sync $(SYNC_FLAGS)

repro: setup
	$(UV) run --frozen --no-sync dvc repro

cluster-repro: setup
	$(UV) run --frozen --no-sync python -m stages.cluster_repro $(if $(ADDRESS),--address $(ADDRESS),) $(TARGETS)

test: setup
	$(UV) run --frozen --no-sync pytest

test-all: setup
	$(UV) run --frozen --no-sync pytest -m ''
