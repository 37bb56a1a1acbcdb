"""Batched rollouts against a plain sequential loop, on the real cube-single task with a scripted oracle policy."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench envs with gymnasium)
import pytest

from stages.core.ogbench_names import resolve_env_id
from stages.core.policy_keys import Keys, episode_seed
from stages.core.rollout import Evaluator, pipeline_groups
from stages.core.stats import wilson_interval
from tests.cube_oracle import ENV_ID, TASK, OraclePolicy, oracle_chunk, outcomes, sequential_rollout

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


def test_call_keys_are_fold_ins_of_the_call_index_across_blocks():
    base = jax.random.fold_in(jax.random.PRNGKey(9), 0x5EED)
    keys = Keys(9, "call", 4)
    for call in (0, 1, Keys.BLOCK - 1, Keys.BLOCK, 3 * Keys.BLOCK + 7, 2):
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
        Evaluator(TASK, num_envs=1, workers=0)
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
    from stages.core.env_workers import Backend

    real = Backend.receive_replay

    def nudged(self):
        ret, taken, done, success, last, frames = real(self)
        return ret, taken, done, success, last + 1e-12, frames  # as if the replay's physics went elsewhere

    monkeypatch.setattr(Backend, "receive_replay", nudged)
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
