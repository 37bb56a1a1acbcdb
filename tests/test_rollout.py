"""Batched rollouts against a plain sequential loop, on the real cube-single task with a scripted oracle policy."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium
import imageio.v3 as iio
import jax
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
from stages.core.ogbench_names import resolve_env_id
from stages.core.rollout import (
    Evaluator,
    _Keys,
    episode_seed,
    evaluate,
    pipeline_groups,
    wilson_interval,
)
from stages.core.video import write_gif

TASK = "cube-single-play-singletask-task2-v0"
ENV_ID = "cube-single-singletask-task2-v0"
CENTER = np.array([0.425, 0.0, 0.0])
TARGET = np.array([0.50, 0.0, 0.02])  # task2's goal cube position


# --------------------------------------------------------------------------------------------------------------------
# A scripted policy that solves cube-single from the state observation (OGBench's Markov cube oracle, phases 1-6,
# reading effector/gripper/cube state from the observation instead of the privileged info dict).
# --------------------------------------------------------------------------------------------------------------------


def _shortest_yaw(eff_yaw: float, obj_yaw: float) -> float:
    symmetries = obj_yaw + np.arange(-4, 5) * np.pi / 2
    return float(symmetries[np.argmin(np.abs(eff_yaw - symmetries))])


def _toward(diff: np.ndarray, min_norm: float = 0.4) -> np.ndarray:
    norm = np.linalg.norm(diff)
    return diff if norm >= min_norm else diff / (norm + 1e-6) * min_norm


def oracle_action(ob: np.ndarray) -> np.ndarray:
    """One oracle action from a cube-single state observation (28 dims)."""
    eff = ob[12:15] / 10 + CENTER
    eff_yaw = float(np.arctan2(ob[16], ob[15]))
    block = ob[19:22] / 10 + CENTER
    block_yaw = _shortest_yaw(eff_yaw, float(np.arctan2(ob[27], ob[26])))
    target_yaw = _shortest_yaw(eff_yaw, 0.0)
    lift = np.array([0.0, 0.0, 0.18])
    closed, above = ob[18] > 0.5, eff[2] > 0.16
    if np.linalg.norm(block[:2] - eff[:2]) > 0.04:
        goal, yaw, grip = block + lift, block_yaw - eff_yaw, -1.0
    elif np.linalg.norm(block - eff) > 0.02:
        goal, yaw, grip = block, block_yaw - eff_yaw, -1.0
    elif not closed:
        goal, yaw, grip = block, block_yaw - eff_yaw, 1.0
    elif np.linalg.norm(TARGET[:2] - block[:2]) > 0.04:
        goal = TARGET + lift if above else np.array([block[0], block[1], 0.36])
        yaw, grip = target_yaw - block_yaw, 1.0
    else:
        goal, yaw, grip = TARGET, target_yaw - block_yaw, 1.0
    action = np.zeros(5)
    action[:3] = _toward(goal - eff) * 5
    action[3], action[4] = yaw * 3, grip
    return np.clip(action, -1, 1)


def oracle_chunk(ob: np.ndarray, h: int) -> np.ndarray:
    """A chunk of h actions: the oracle action, fading out along the chunk (so every position matters)."""
    return oracle_action(ob)[None, :] * np.linspace(1.0, 0.6, h)[:, None]


class OraclePolicy:
    """Batched oracle chunks; counts its calls. With ``noise`` it adds per-row noise drawn from row keys."""

    def __init__(self, h: int, noise: float = 0.0):
        self.h, self.noise, self.calls = h, noise, 0
        self._normal = jax.jit(jax.vmap(lambda k: jax.random.normal(k, (h, 5))))

    def __call__(self, observations: np.ndarray, key) -> np.ndarray:
        self.calls += 1
        chunks = np.stack([oracle_chunk(ob.astype(np.float64), self.h) for ob in observations])
        if self.noise:
            chunks = chunks + self.noise * np.asarray(self._normal(key))
        return chunks.astype(np.float32)


def sequential_rollout(env, chunk_fn, seed: int, episodes: int, limit: int) -> list[tuple[bool, float, int]]:
    """The plain way: one episode at a time, chunks executed open-loop. Returns (success, return, length) each."""
    out = []
    for j in range(episodes):
        s = episode_seed(seed, j)
        env.unwrapped.action_space.seed(s)
        obs, _ = env.reset(seed=s)
        ret, length, done, success = 0.0, 0, False, False
        while not done:
            for action in np.clip(chunk_fn(obs.astype(np.float32).astype(np.float64)), -1, 1):
                obs, reward, terminated, truncated, info = env.step(action)
                ret, length, success = ret + reward, length + 1, bool(info["success"])
                done = terminated or truncated or length >= limit
                if done:
                    break
        out.append((success, ret, length))
    return out


def outcomes(result) -> list[tuple[bool, float, int]]:
    return [(e.success, e.episode_return, e.length) for e in result.episodes]


@pytest.fixture(scope="module")
def local():
    with Evaluator(TASK, num_envs=2, workers=1) as evaluator:
        yield evaluator


@pytest.fixture(scope="module")
def plain_env():
    env = gymnasium.make(ENV_ID)
    yield env
    env.close()


# --------------------------------------------------------------------------------------------------------------------
# Episodes, success accounting, chunks
# --------------------------------------------------------------------------------------------------------------------


def test_matches_sequential_loop_with_successes_and_failures(local, plain_env):
    # h=1 oracle solves task2 in ~38-47 steps; a 42-step cap makes some episodes succeed and some time out.
    result = local.run(OraclePolicy(h=1), episodes=4, seed=1, max_episode_steps=42)
    expected = sequential_rollout(plain_env, lambda ob: oracle_chunk(ob, 1), seed=1, episodes=4, limit=42)
    assert outcomes(result) == expected
    successes = [s for s, _, _ in expected]
    assert any(successes) and not all(successes), "the cap should split successes and time-outs"
    for e in result.episodes:
        assert e.success == (e.length < 42)  # an episode ends early only on success
        assert e.episode_return == -(e.length - 1 if e.success else e.length)  # reward 0 on the success step
    summary = result.summary
    assert summary.episodes == 4 and [e.episode for e in result.episodes] == [0, 1, 2, 3]
    assert summary.successes == sum(successes) and summary.success_rate == sum(successes) / 4
    assert summary.success_ci95 == pytest.approx(wilson_interval(sum(successes), 4))
    assert summary.env_steps == sum(length for _, _, length in expected)
    assert summary.mean_length == pytest.approx(np.mean([length for _, _, length in expected]))


def test_chunks_run_open_loop_and_query_once_per_chunk(local, plain_env):
    policy = OraclePolicy(h=5)
    result = local.run(policy, episodes=3, seed=1, max_episode_steps=123)
    expected = sequential_rollout(plain_env, lambda ob: oracle_chunk(ob, 5), seed=1, episodes=3, limit=123)
    assert outcomes(result) == expected
    for e in result.episodes:
        assert e.policy_queries == math.ceil(e.length / 5)
    assert result.summary.policy_calls == policy.calls
    assert policy.calls < sum(e.policy_queries for e in result.episodes)  # both envs were queried together


def test_single_env_calls_policy_ceil_length_over_h_times(local):
    policy = OraclePolicy(h=5)
    result = local.run(policy, episodes=1, seed=2, max_episode_steps=33)
    (episode,) = result.episodes
    assert policy.calls == math.ceil(episode.length / 5) == episode.policy_queries


def test_same_results_for_any_num_envs_and_workers(local):
    kwargs = {"episodes": 5, "seed": 3, "key_mode": "row", "max_episode_steps": 60}
    in_process = local.run(OraclePolicy(h=2, noise=0.3), **kwargs)
    with Evaluator(TASK, num_envs=3, workers=2) as spread:
        assert spread.workers == 2
        across = spread.run(OraclePolicy(h=2, noise=0.3), **kwargs)
        again = spread.run(OraclePolicy(h=2, noise=0.3), **kwargs)
    assert outcomes(across) == outcomes(in_process) == outcomes(again)
    assert [e.seed for e in across.episodes] == [episode_seed(3, j) for j in range(5)]
    assert len({e.length for e in across.episodes}) > 1, "noise should make episodes differ"
    other_seed = local.run(OraclePolicy(h=2, noise=0.3), **{**kwargs, "seed": 4})
    assert outcomes(other_seed) != outcomes(in_process)


def test_pipeline_queries_half_the_envs_at_a_time_with_the_same_results(local):
    kwargs = {"episodes": 4, "seed": 5, "key_mode": "row", "max_episode_steps": 30}
    plain, piped = OraclePolicy(h=3, noise=0.3), OraclePolicy(h=3, noise=0.3)
    sizes = []

    def recording(obs, key):
        sizes.append(len(obs))
        return piped(obs, key)

    together = local.run(plain, **kwargs)
    apart = local.run(recording, pipeline=True, **kwargs)
    assert outcomes(apart) == outcomes(together)
    assert set(sizes) == {1} and apart.summary.policy_calls == sum(e.policy_queries for e in apart.episodes)
    assert plain.calls < piped.calls
    assert pipeline_groups(8, 2, True) == [[0, 1, 4, 5], [2, 3, 6, 7]]  # each group: 2 envs on each worker
    assert pipeline_groups(3, 2, False) == [[0, 1, 2]]
    with pytest.raises(ValueError, match=r"pipeline needs num_envs >= 2 \* workers"):
        pipeline_groups(3, 2, True)


def test_actions_are_clipped(local):
    # A policy far outside [-1, 1] must act exactly like its clipped twin.
    big = local.run(lambda obs, key: np.full((2, 3, 5), 7.0, np.float32), episodes=2, max_episode_steps=9)
    ones = local.run(lambda obs, key: np.ones((2, 3, 5), np.float32), episodes=2, max_episode_steps=9)
    assert outcomes(big) == outcomes(ones)


# --------------------------------------------------------------------------------------------------------------------
# Fast env stepping: bitwise the plain gymnasium env
# --------------------------------------------------------------------------------------------------------------------


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


def test_call_keys_are_fold_ins_of_the_call_index_across_blocks():
    base = jax.random.fold_in(jax.random.PRNGKey(9), 0x5EED)
    keys = _Keys(9, "call", 4)
    for call in (0, 1, _Keys.BLOCK - 1, _Keys.BLOCK, 3 * _Keys.BLOCK + 7, 2):
        key = keys(call, np.zeros(0, np.uint32), np.zeros(0, np.uint32))
        assert key.dtype == np.uint32 and np.array_equal(key, np.asarray(jax.random.fold_in(base, call)))


def test_warm_up_calls_the_policy_once_on_zeros_first(local):
    seen = []

    def policy(obs, key):
        seen.append(obs.copy())
        return np.zeros((2, 3, 5), np.float32)

    result = local.run(policy, episodes=2, max_episode_steps=6, warm_up=True)
    assert len(seen) == result.summary.policy_calls + 1 == 3
    assert not seen[0].any() and seen[1].any()
    assert result.summary.warm_up_time_s > 0 and 0 < result.summary.policy_time_s < result.summary.wall_time_s


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


# --------------------------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (np.zeros((2, 5), np.float32), r"shape \(2, 5\), expected \(2, h, 5\)"),
        (np.zeros((2, 4, 3), np.float32), r"shape \(2, 4, 3\), expected \(2, h, 5\)"),
        (np.zeros((1, 4, 5), np.float32), r"shape \(1, 4, 5\), expected \(2, h, 5\)"),
        (np.zeros((2, 4, 5), np.int32), r"dtype int32"),
        (np.full((2, 4, 5), np.nan, np.float32), r"non-finite action \(row 0"),
    ],
)
def test_bad_policy_output_is_named(local, output, message):
    with pytest.raises(ValueError, match=message):
        local.run(lambda obs, key: output, episodes=1, max_episode_steps=5)


def test_changing_chunk_length_is_an_error(local):
    lengths = iter([3, 4])
    with pytest.raises(ValueError, match="chunks of length 4, but earlier calls returned 3"):
        local.run(
            lambda obs, key: np.zeros((2, next(lengths), 5), np.float32), episodes=2, max_episode_steps=9
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 1}, "batch_size must be an integer >= num_envs"),
        ({"max_episode_steps": 201}, "exceeds the time limit"),
        ({"episodes": 0}, "episodes must be a positive integer"),
        ({"key_mode": "episode"}, "key_mode must be 'call' or 'row'"),
        ({"video_episodes": 3, "episodes": 2}, "video_episodes must be"),
    ],
)
def test_bad_run_arguments(local, kwargs, message):
    with pytest.raises(ValueError, match=message):
        local.run(OraclePolicy(h=1), **kwargs)


def test_bad_evaluator_arguments():
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        evaluate(OraclePolicy(h=1), TASK, workers=0)
    with pytest.raises(ValueError, match="unknown OGBench environment 'cube-single-singletask-task9-v0'"):
        Evaluator("cube-single-singletask-task9-v0")


def test_env_names_resolve():
    assert resolve_env_id(TASK) == ENV_ID
    assert resolve_env_id(ENV_ID) == ENV_ID
    assert resolve_env_id("puzzle-3x3-play-singletask-v0") == "puzzle-3x3-singletask-v0"


def test_wilson_interval_and_seeds():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(50, 50) == pytest.approx((0.9287, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    seeds = [episode_seed(0, j) for j in range(100)] + [episode_seed(1, j) for j in range(100)]
    assert len(set(seeds)) == 200 and episode_seed(0, 7) == episode_seed(0, 7)


# --------------------------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------------------------


def test_video_frames_and_gif(local, tmp_path):
    result = local.run(OraclePolicy(h=5), episodes=2, max_episode_steps=10, video_episodes=1, frame_skip=4)
    assert set(result.videos) == {0}
    frames = result.videos[0]
    assert frames.shape == (4, 200, 200, 3) and frames.dtype == np.uint8  # reset, steps 4 and 8, last step 10
    assert not np.array_equal(frames[0], frames[-1]), "the arm moves between the first and last frame"
    assert local._backend.local.envs[0].unwrapped._model.vis.quality.shadowsize == 1024  # cheaper shadow map
    path = write_gif(tmp_path / "sub" / "rollout.gif", frames, fps=10)
    back = iio.imread(path, index=None)
    assert back.shape[:3] == (4, 200, 200)
    assert [p.name for p in path.parent.iterdir()] == ["rollout.gif"]  # no temporary file left behind
    with pytest.raises(ValueError, match="no frames"):
        write_gif(tmp_path / "empty.gif", [])


def test_video_frames_without_shadows_turn_off_every_lights_shadow_and_keep_the_same_episode(local):
    """shadow_size=0 (the evaluate stage's GIF): no light casts a shadow, frames differ, the episode is the same."""
    with Evaluator(TASK, num_envs=1, workers=1, shadow_size=0) as shadowless:
        plain = shadowless.run(OraclePolicy(h=5), episodes=1, max_episode_steps=10, video_episodes=1, frame_skip=4)
        model = shadowless._backend.local.envs[0].unwrapped._model
        assert model.nlight > 0 and not model.light_castshadow.any()
    shadowed = local.run(OraclePolicy(h=5), episodes=1, max_episode_steps=10, video_episodes=1, frame_skip=4)
    assert local._backend.local.envs[0].unwrapped._model.light_castshadow.any()
    assert plain.videos[0].shape == shadowed.videos[0].shape
    assert not np.array_equal(plain.videos[0], shadowed.videos[0]), "the shadow of the arm is gone"
    assert plain.to_dict()["episodes"] == shadowed.to_dict()["episodes"]  # rendering changes no step of the episode
    with pytest.raises(ValueError, match="shadow_size"):
        Evaluator(TASK, num_envs=1, workers=1, shadow_size=-1)


# --------------------------------------------------------------------------------------------------------------------
# Worker processes only (in_process=False), the video process, workers that die with their parent
# --------------------------------------------------------------------------------------------------------------------


def test_envs_in_worker_processes_only_give_the_same_results_and_frames(local, tmp_path, monkeypatch):
    kwargs = {"episodes": 3, "seed": 7, "key_mode": "row", "max_episode_steps": 24, "video_episodes": 2,
              "frame_skip": 5}
    inline = local.run(OraclePolicy(h=3, noise=0.2), **kwargs)
    timeline = tmp_path / "timeline.tsv"
    monkeypatch.setenv("RQL_EVAL_TIMELINE", str(timeline))
    seen = []

    def policy(obs, key):
        seen.append(obs.shape)
        return OraclePolicy(h=3, noise=0.2)(obs, key)

    with Evaluator(TASK, num_envs=2, workers=2, in_process=False, video_processes=2) as remote:
        assert remote._backend.local is None and len(remote._backend.procs) == 4  # 2 env + 2 video processes
        assert not remote._backend.spaces_known(), "the constructor must not wait for the workers"
        replayed = remote.run(policy, **kwargs, warm_up=True, obs_shape=(28,))
        assert remote.obs_shape == (28,) and remote.action_dim == 5
        with pytest.raises(ValueError, match="obs_shape"):
            remote.run(policy, episodes=1, max_episode_steps=3, obs_shape=(27,))
    assert outcomes(replayed) == outcomes(inline)
    assert seen[0] == (2, 28) and replayed.summary.policy_calls == len(seen) - 1  # the warm-up call first
    assert set(replayed.videos) == set(inline.videos) == {0, 1}
    for j in (0, 1):  # replayed from the seed and the executed actions (each process rendering every other
        # frame): the very frames rendered while it ran, in order
        assert replayed.videos[j].shape[0] == inline.videos[j].shape[0] > 2
        assert np.array_equal(replayed.videos[j], inline.videos[j])
    events = [line.split("\t")[0] for line in timeline.read_text().splitlines()][:5]  # then the bad run's
    assert events == ["warm-up done", "envs ready", "first episode end", "episodes done", "videos done"]


def test_a_diverging_replay_is_an_error(monkeypatch):
    from stages.core import rollout

    real = rollout._Backend.receive_replay

    def nudged(self):
        ret, taken, done, success, last, frames = real(self)
        return ret, taken, done, success, last + 1e-12, frames  # as if the replay's physics went elsewhere

    monkeypatch.setattr(rollout._Backend, "receive_replay", nudged)
    with (Evaluator(TASK, num_envs=1, workers=1, video_processes=1) as evaluator,
          pytest.raises(RuntimeError, match="replay of episode 0 .* diverged.*same last observation: False")):
        evaluator.run(OraclePolicy(h=2), episodes=1, max_episode_steps=4, video_episodes=1)


_ORPHAN_SCRIPT = """
import os, sys, time
from stages.core.rollout import Evaluator
evaluator = Evaluator("cube-single-play-singletask-task2-v0", num_envs=1, workers=1, in_process=False)
evaluator._backend.wait_ready()
holder = os.fork()  # keeps this process's end of the worker's socket open: the worker sees no EOF when we die
if holder == 0:
    time.sleep(60)
    os._exit(0)
print(evaluator._backend.procs[0].pid, holder, flush=True)
sys.stdin.read()  # until killed
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent():
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], cwd=root, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    holder = None
    try:
        worker, holder = (int(p) for p in parent.stdout.readline().split())
        assert _alive(worker)
        parent.kill()  # SIGKILL: no finalizer, no atexit, and the socket stays open in `holder`
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), f"worker {worker} outlived its killed parent"
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if holder is not None and _alive(holder):
            os.kill(holder, signal.SIGKILL)


def test_a_failure_with_videos_in_flight_retires_the_evaluator():
    calls = []

    def failing(obs, key):  # fine until the video episode has ended and gone to the video process
        calls.append(1)
        if len(calls) > 3:
            return np.full((1, 2, 5), np.nan, np.float32)
        return OraclePolicy(h=2)(obs, key)

    with Evaluator(TASK, num_envs=1, workers=1, video_processes=1) as evaluator:
        with pytest.raises(ValueError, match="non-finite"):
            evaluator.run(failing, episodes=2, max_episode_steps=4, video_episodes=1)
        with pytest.raises(RuntimeError, match="make a new one"):
            evaluator.run(OraclePolicy(h=2), episodes=1, max_episode_steps=4)
