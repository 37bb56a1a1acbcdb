"""Fast env stepping (stages/core/fast_env.py): bitwise the plain gymnasium env, for cube, scene and puzzle."""

from __future__ import annotations

import gymnasium
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench envs with gymnasium)
import pytest

from stages.core.fast_env import (
    ManipStepper,
    PlainStepper,
    Step,
    clip,
    clone_env,
    make_stepper,
    quat_apply,
    quat_from_z,
    quat_mul,
    yaw_of,
)
from tests.cube_oracle import ENV_ID, oracle_action


def assert_same_step(plain: Step, fast: Step, where: str) -> None:
    """Observation bytes (signed zeros included), dtype, reward type and value, flags and success all identical."""
    assert plain.observation.dtype == fast.observation.dtype and plain.observation.shape == fast.observation.shape
    assert plain.observation.tobytes() == fast.observation.tobytes(), f"{where}: observations differ"
    assert type(plain.reward) is type(fast.reward) and plain.reward == fast.reward, f"{where}: rewards differ"
    assert plain[2:] == fast[2:], f"{where}: (terminated, truncated, success) {plain[2:]} != {fast[2:]}"


def side_by_side(plain: PlainStepper, fast: ManipStepper, seed: int, act) -> list[Step]:
    """One whole episode of both steppers on the same actions ``act(observation)``; returns the plain steps."""
    obs_plain, obs_fast = plain.reset(seed), fast.reset(seed)
    assert obs_plain.tobytes() == obs_fast.tobytes()
    steps = []
    while not steps or not (steps[-1].terminated or steps[-1].truncated):
        action = act(steps[-1].observation if steps else obs_plain)
        a, b = plain.step(action), fast.step(action)
        assert_same_step(a, b, f"seed {seed}, step {len(steps) + 1}")
        steps.append(a)
    return steps


def test_fast_cube_steps_are_bitwise_the_gymnasium_env(plain_env):
    # the fast stepper runs a clone of the plain env (as the Evaluator's extra envs are): both must match it
    clone = clone_env(plain_env)
    assert clone.unwrapped._model is not plain_env.unwrapped._model
    assert clone.unwrapped._ik._data is not plain_env.unwrapped._ik._data
    fast = make_stepper(clone)
    assert isinstance(fast, ManipStepper) and fast.time_limit == 200
    plain = PlainStepper(plain_env)
    with pytest.raises(RuntimeError, match="before reset"):
        fast.step(np.zeros(5))
    # the oracle solves the task: terminated with success, reward 0 on the success step (-1 before it)
    for seed in (0, 1):
        steps = side_by_side(plain, fast, seed, lambda ob: oracle_action(ob.astype(np.float64)))
        assert steps[-1].terminated and steps[-1].success and not steps[-1].truncated and len(steps) < 100
        assert [s.reward for s in steps] == [-1.0] * (len(steps) - 1) + [0.0]
    # random float32 actions (out-of-range ones included: the controller clips them) until the time limit
    rng = np.random.default_rng(0)
    steps = side_by_side(plain, fast, 2, lambda ob: rng.uniform(-1.5, 1.5, 5).astype(np.float32))
    assert len(steps) == 200 and steps[-1].truncated and not any(s.terminated or s.success for s in steps)


def button_presser(env, period: int = 40):
    """Actions that press the buttons of a scene/puzzle env in turn (reads button positions from the env)."""
    u, count = env.unwrapped, [0]

    def act(_ob):
        button = (count[0] // period) % len(u._button_site_ids)
        count[0] += 1
        eff = u._data.site_xpos[u._pinch_site_id]
        top = u._data.site_xpos[u._button_site_ids[button]]
        goal = top + (0.0, 0.0, 0.06) if np.linalg.norm((top - eff)[:2]) > 0.01 else top - (0.0, 0.0, 0.05)
        return np.array([*np.clip((goal - eff) / 0.05, -1, 1), 0.0, 1.0])

    return act


@pytest.mark.parametrize("env_id", ["puzzle-3x3-singletask-task2-v0", "scene-singletask-task2-v0"])
def test_fast_button_env_steps_are_bitwise_the_gymnasium_env(env_id):
    # One env, two passes: the plain env records 160 steps of button pressing, then the fast stepper replays them
    # from the same reset. Button presses go through post_step's comparison with the pre-step button positions.
    env = gymnasium.make(env_id)
    plain, fast = PlainStepper(env), make_stepper(env)
    assert isinstance(fast, ManipStepper) and fast.kind == env_id.split("-")[0]
    act = button_presser(env)
    first = plain.reset(5)
    recorded, states = [], []
    for _ in range(160):
        action = act(None)
        recorded.append((action, plain.step(action)))
        states.append(tuple(env.unwrapped._cur_button_states))
    assert fast.reset(5).tobytes() == first.tobytes()
    replayed = []
    for k, (action, expected) in enumerate(recorded):
        assert_same_step(expected, fast.step(action), f"{env_id} step {k + 1}")
        replayed.append(tuple(env.unwrapped._cur_button_states))
    assert replayed == states and len(set(states)) >= 3, "buttons should have been pressed"
    assert len({step.reward for _, step in recorded}) >= 2
    env.close()


def test_scalar_helpers_match_ogbench_lie_bitwise():
    from ogbench.manipspace.lie import SO3

    rng = np.random.default_rng(0)
    thetas = [0.0, -0.0, 1e-12, -3e-6, np.pi, -np.pi, *rng.uniform(-4, 4, 200)]
    for theta in thetas:
        assert np.array(quat_from_z(float(theta))).tobytes() == SO3.from_z_radians(np.float64(theta)).wxyz.tobytes()
    for _ in range(200):
        a, b = SO3(rng.normal(size=4)), SO3(rng.normal(size=4))
        v = rng.normal(size=3)
        assert np.array(quat_mul(a.wxyz.tolist(), b.wxyz.tolist())).tobytes() == (a @ b).wxyz.tobytes()
        assert np.array(quat_apply(a.wxyz.tolist(), v.tolist())).tobytes() == (a @ v).tobytes()
        assert np.float64(yaw_of(a.wxyz.tolist())).tobytes() == np.float64(a.compute_yaw_radians()).tobytes()
    for x in [-0.0, 0.0, 0.5, 1.0, -2.0, 3.0, float("nan")]:
        assert np.float64(clip(x, 0.0, 1.0)).tobytes() == np.clip(np.array([x]), 0, 1)[0].tobytes()


def test_other_envs_are_stepped_plainly():
    env = gymnasium.make("CartPole-v1")
    stepper = make_stepper(env)
    assert isinstance(stepper, PlainStepper) and not stepper.fast
    stepper.reset(0)
    assert isinstance(stepper.step(0), Step)
    with pytest.raises(ValueError, match="needs a state-based OGBench cube, scene or puzzle env"):
        ManipStepper(env)
    with pytest.raises(ValueError, match="copies OGBench cube/scene/puzzle envs"):
        clone_env(env)
    assert isinstance(make_stepper(gymnasium.make(ENV_ID), fast=False), PlainStepper)
