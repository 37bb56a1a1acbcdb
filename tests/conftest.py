"""Shared test set-up: headless rendering and quiet, deterministic JAX on the CPU."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest


@pytest.fixture(scope="module")
def local():
    """An in-process Evaluator of cube-single task 2 with two envs (tests/cube_oracle.py solves it)."""
    from stages.core.rollout import Evaluator
    from tests.cube_oracle import TASK

    with Evaluator(TASK, num_envs=2, workers=1) as evaluator:
        yield evaluator


@pytest.fixture(scope="module")
def plain_env():
    """The plain gymnasium env of cube-single task 2."""
    import gymnasium
    import ogbench  # noqa: F401  (registers the OGBench envs with gymnasium)

    from tests.cube_oracle import ENV_ID

    env = gymnasium.make(ENV_ID)
    yield env
    env.close()
