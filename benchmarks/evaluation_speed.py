"""Evaluation speed: the reference's evaluation loop against ``stages.core.rollout``, same policy, same episodes.

(a) reference way (as in the RQL reference's ``utils/evaluation.py`` + ``envs/env_utils.py``): one env, one episode
    at a time; the policy is called at EVERY env step with a batch of one (a fresh key split each time), and an
    action-chunking wrapper executes the chunk from the call at the chunk's start, ignoring the calls inside it;
    per-step transition and info bookkeeping as the reference does.
(b) this project's way: ``rollout.Evaluator`` -- ``num_envs`` envs over ``workers`` processes stepped with
    ``fast_env`` (bitwise the plain env's outputs), one batched, padded policy call per chunk, pipelined (half the
    envs step while the policy computes the other half's chunks).

The policy is a flow policy: F Euler steps of an MLP velocity field v(obs, x, t) producing an (h, d) action chunk,
jitted with JAX: randomly initialised by default (its success rate is ~0; the point is the cost of a paper-sized
network), or with `--policy` a trained export of the pipeline (then success rates mean something, and the episodes
reach the cube: contact-rich physics). Both ways use the same parameters and both are compiled before timing. Env
creation (and worker start) is timed apart.

Per-step costs and bounds are measured on (a)'s own episodes, replayed from their seeds and actions: the plain
gymnasium step, the fast stepper, and MuJoCo alone on the controls the stepper applied. "bound" is the speedup (b)
would reach with every core fully busy doing only fast steps (or only physics), nothing else.

    MUJOCO_GL=egl .venv/bin/python benchmarks/evaluation_speed.py            # 50 episodes, ~1-2 minutes
    MUJOCO_GL=egl .venv/bin/python benchmarks/evaluation_speed.py --policy data/runs/rql/<dataset>/task<k>/seed0/policy.msgpack
    MUJOCO_GL=egl .venv/bin/python benchmarks/evaluation_speed.py --episodes 10 --hidden 256,256
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from stages.core.ogbench_names import resolve_env_id
from stages.core.policy_keys import episode_seed
from stages.core.rollout import Evaluator
from stages.core.stats import wilson_interval

# --------------------------------------------------------------------------------------------------------------------
# A small self-contained flow policy
# --------------------------------------------------------------------------------------------------------------------


def init_mlp(key: jax.Array, sizes: list[int]) -> list[tuple[jax.Array, jax.Array]]:
    """LeCun-normal weights, zero biases."""
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        params.append((jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in), jnp.zeros(fan_out)))
    return params


def mlp(params, x: jax.Array) -> jax.Array:
    for w, b in params[:-1]:
        x = jax.nn.gelu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def flow_actions(params, observations: jax.Array, noise: jax.Array, flow_steps: int) -> jax.Array:
    """Euler integration of the velocity field from noise at t=0 to actions at t=1, clipped to [-1, 1]."""
    x = noise
    for i in range(flow_steps):
        t = jnp.full((*observations.shape[:-1], 1), i / flow_steps)
        x = x + mlp(params, jnp.concatenate([observations, x, t], axis=-1)) / flow_steps
    return jnp.clip(x, -1.0, 1.0)


def make_policies(obs_dim: int, action_dim: int, h: int, hidden: list[int], flow_steps: int, seed: int):
    """The same flow policy twice: the reference's single-observation ``sample_actions`` and a batched one.

    Parameters are passed to the jitted functions as arguments (as an agent's are), not baked in as constants.
    """
    params = init_mlp(jax.random.PRNGKey(seed), [obs_dim + h * action_dim + 1, *hidden, h * action_dim])

    @jax.jit
    def sample_one(
        params, obs: jax.Array, key: jax.Array
    ) -> jax.Array:  # like the reference: (obs,) -> (h, d)
        _, noise_key = jax.random.split(key)
        obs = jnp.atleast_2d(obs)[-1:]
        noise = jax.random.normal(noise_key, (1, h * action_dim))
        return flow_actions(params, obs, noise, flow_steps)[0].reshape(h, action_dim)

    @jax.jit
    def sample_batch(params, observations: jax.Array, key: jax.Array) -> jax.Array:  # (n, obs) -> (n, h, d)
        noise = jax.random.normal(key, (observations.shape[0], h * action_dim))
        return flow_actions(params, observations, noise, flow_steps).reshape(-1, h, action_dim)

    return partial(sample_one, params), partial(sample_batch, params)


def load_exported_policies(path: str, task: str):
    """A trained policy export (the train/prior stages' ``policy.msgpack``): the same two calling conventions.

    The batched policy is the one the evaluate stage uses; the reference way calls it with a batch of one.
    """
    from stages.agent_setup import config_from_metadata, make_policy
    from stages.core.policy_file import load_policy

    loaded = load_policy(path)
    if loaded.metadata.get("task") not in (None, task):
        raise SystemExit(f"{path} was trained on {loaded.metadata['task']}, not {task}: pass --task")
    algorithm, config = config_from_metadata(loaded.metadata)
    batched = make_policy(algorithm, config, loaded.params)

    def one(obs, key):
        return batched(np.asarray(obs, np.float32)[None], key)[0]

    return one, batched, f"{algorithm} export {path}"


def step_costs(env_id: str, trajectories: list[tuple[int, list[np.ndarray]]], max_steps: int = 2000) -> dict:
    """Seconds per env step on the evaluated policy's own episodes (replayed from their seeds and actions):

    ``plain``: ``gymnasium.make(env_id).step`` (what (a) pays); ``fast``: the rollout's stepper (what (b) pays per
    step, see stages.core.fast_env); ``physics``: MuJoCo alone (``mj_step`` of the env's substeps and the contact
    forces it reads, on the controls the fast replay recorded), the floor no evaluation loop can go under. The
    policy's own states matter: grasping and pushing the cube is contact-rich, so physics costs more per step than
    under random actions.
    """
    import mujoco

    from stages.core.fast_env import PlainStepper, make_stepper

    episodes, total = [], 0
    for seed, actions in trajectories:  # whole episodes, up to about max_steps steps
        if total >= max_steps:
            break
        episodes.append((seed, actions))
        total += len(actions)

    def per_step_seconds(stepper, episodes, step) -> float:
        """Reset to each episode's seed, then time `step` on each of its items."""
        elapsed = 0.0
        for seed, items in episodes:
            stepper.reset(seed)
            start = time.perf_counter()
            for item in items:
                step(item)
            elapsed += time.perf_counter() - start
        return elapsed / total

    env = gymnasium.make(env_id)
    plain = PlainStepper(env)
    out = {"plain": per_step_seconds(plain, episodes, plain.step)}
    env.close()

    env = gymnasium.make(env_id)
    u, fast = env.unwrapped, make_stepper(env, fast=True)
    out["fast"] = per_step_seconds(fast, episodes, fast.step)

    controls = []  # the controls the fast stepper applies on these episodes (an untimed replay)
    for seed, actions in episodes:
        fast.reset(seed)
        episode = []
        for action in actions:
            fast.step(action)
            episode.append(u._data.ctrl.copy())
        controls.append((seed, episode))

    def physics(ctrl) -> None:
        u._data.ctrl[:] = ctrl
        mujoco.mj_step(u._model, u._data, nstep=u._n_steps)
        mujoco.mj_rnePostConstraint(u._model, u._data)

    out["physics"] = per_step_seconds(fast, controls, physics)
    env.close()
    return out


# --------------------------------------------------------------------------------------------------------------------
# (a) The reference's evaluation loop
# --------------------------------------------------------------------------------------------------------------------


class StepMonitor(gymnasium.Wrapper):
    """Episode return/length bookkeeping and per-step info filtering, as the reference's episode monitor does."""

    def __init__(self, env, drop=(r".*privileged.*", r".*proprio.*")):
        super().__init__(env)
        self.drop = [re.compile(p) for p in drop]
        self.ret, self.length = 0.0, 0

    def reset(self, **kwargs):
        self.ret, self.length = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        for key in [k for k in info if any(p.match(k) for p in self.drop)]:
            del info[key]
        self.ret += reward
        self.length += 1
        if terminated or truncated:
            info["episode"] = {"return": self.ret, "length": self.length}
        return obs, reward, terminated, truncated, info


class ChunkQueue(gymnasium.Wrapper):
    """Takes a whole chunk at every step but only uses it when its queue of actions is empty (the reference's way)."""

    def __init__(self, env):
        super().__init__(env)
        self.queue: list[np.ndarray] = []
        # this episode's actions: not part of the reference, kept for step_costs' replay
        self.executed: list[np.ndarray] = []

    def reset(self, **kwargs):
        self.queue.clear()
        self.executed = []
        return self.env.reset(**kwargs)

    def step(self, chunk):
        if not self.queue:
            self.queue.extend(chunk)
        action = self.queue.pop(0)
        self.executed.append(action)
        return self.env.step(action)


def reference_way(env, sample_one, episodes: int, seed: int, progress: bool) -> dict:
    """One episode at a time, a policy call at every step; returns outcomes and counts."""
    rng = jax.random.PRNGKey(seed)
    successes, lengths, returns, calls, trajectories = [], [], [], 0, []
    start = time.perf_counter()
    for j in _maybe_tqdm(range(episodes), progress, "reference"):
        s = episode_seed(seed, j)
        env.unwrapped.action_space.seed(s)
        obs, _ = env.reset(seed=s)
        traj = defaultdict(list)
        done = False
        while not done:
            rng, key = jax.random.split(rng)
            chunk = np.clip(np.array(sample_one(obs, key)), -1, 1)
            calls += 1
            next_obs, reward, terminated, truncated, info = env.step(chunk)
            done = terminated or truncated
            transition = {"observation": obs, "next_observation": next_obs, "action": chunk, "reward": reward}
            for k, v in {**transition, "done": done, "info": info}.items():
                traj[k].append(v)
            obs = next_obs
        trajectories.append((s, env.executed))
        successes.append(bool(info["success"]))
        lengths.append(info["episode"]["length"])
        returns.append(info["episode"]["return"])
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "successes": successes,
        "lengths": lengths,
        "returns": returns,
        "calls": calls,
        "trajectories": trajectories,
    }


def _maybe_tqdm(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="ep")


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="cube-single-play-singletask-task2-v0")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="worker processes for (b); 1 = in process")
    parser.add_argument("--num-envs", type=int, default=None, help="envs for (b); default 4 * workers")
    parser.add_argument("--hidden", default="512,512,512,512", help="MLP hidden sizes, comma-separated")
    parser.add_argument("--flow-steps", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=5, help="action chunk length h")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--policy", default=None, help="a trained policy.msgpack instead of the random flow policy"
    )
    parser.add_argument(
        "--plain-env", action="store_true", help="(b) steps the gymnasium env itself, no fast_env"
    )
    parser.add_argument(
        "--no-pipeline",
        action="store_true",
        help="(b) queries all envs at once instead of one half while the other half steps",
    )
    parser.add_argument("--progress", action="store_true", help="tqdm progress bars")
    return parser.parse_args(argv)


def line(name: str, wall: float, episodes: int, steps: int, calls: int, successes: int, setup: float) -> str:
    low, high = wilson_interval(successes, episodes)
    return (
        f"{name:<22} {wall:8.2f} s  {episodes / wall:7.2f} ep/s  {steps / wall:8.0f} steps/s  {calls:7d} calls  "
        f"success {successes}/{episodes} [{low:.2f}, {high:.2f}]  (env setup {setup:.1f} s)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hidden = [int(x) for x in args.hidden.split(",") if x]
    env_id = resolve_env_id(args.task)
    size = "x".join(map(str, hidden))
    what = "" if args.policy else f"random flow policy {size} MLP, F={args.flow_steps}, h={args.horizon}; "
    platform = f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs"
    print(f"{env_id}: {args.episodes} episodes, {what}{platform}; load average {_load()}")

    # (b) first (its workers start before anything else runs); both policies are compiled before timing.
    start = time.perf_counter()
    num_envs = 4 * args.workers if args.num_envs is None else args.num_envs  # cheap: extra envs are clones
    evaluator = Evaluator(env_id, num_envs=num_envs, workers=args.workers, fast_env=not args.plain_env)
    evaluator._backend.wait_ready()  # env setup measured apart from the rollout
    setup_b = time.perf_counter() - start
    with evaluator:
        obs_dim, action_dim = int(np.prod(evaluator.obs_shape)), evaluator.action_dim
        if args.policy:
            sample_one, sample_batch, what = load_exported_policies(args.policy, args.task)
            print(f"policy: {what}")
        else:
            sample_one, sample_batch = make_policies(
                obs_dim, action_dim, args.horizon, hidden, args.flow_steps, args.seed
            )
        pipeline = not args.no_pipeline and evaluator.num_envs >= 2 * evaluator.workers
        rows = evaluator.num_envs // 2 if pipeline else evaluator.num_envs
        warm = np.zeros((rows, obs_dim), np.float32)
        key = jax.random.PRNGKey(0)
        np.asarray(sample_batch(warm, key))
        np.asarray(sample_one(warm[0], key))
        cpu_start = cpu_seconds(evaluator._backend.procs)
        result = evaluator.run(
            sample_batch, episodes=args.episodes, seed=args.seed, progress=args.progress, pipeline=pipeline
        )
        cpu_b = cpu_seconds(evaluator._backend.procs) - cpu_start

    start = time.perf_counter()
    env = ChunkQueue(StepMonitor(gymnasium.make(env_id)))
    env.reset(seed=0)
    setup_a = time.perf_counter() - start
    cpu_start = cpu_seconds([])
    ref = reference_way(env, sample_one, args.episodes, args.seed, args.progress)
    cpu_a = cpu_seconds([]) - cpu_start
    env.close()

    costs = step_costs(env_id, ref["trajectories"])
    s = result.summary
    print(
        line(
            "(a) reference way",
            ref["wall"],
            args.episodes,
            sum(ref["lengths"]),
            ref["calls"],
            sum(ref["successes"]),
            setup_a,
        )
    )
    fast = "fast env" if evaluator.fast_env else "plain env"
    print(
        line(
            f"(b) rollout {evaluator.num_envs}env/{evaluator.workers}w",
            s.wall_time_s,
            s.episodes,
            s.env_steps,
            s.policy_calls,
            s.successes,
            setup_b,
        )
        + f", {fast}, {'pipelined' if pipeline else 'not pipelined'}, policy {s.policy_time_s:.2f} s"
    )
    print(
        f"speedup: {ref['wall'] / s.wall_time_s:.2f}x rollout time, "
        f"{(ref['wall'] + setup_a) / (s.wall_time_s + setup_b):.2f}x including env setup; "
        f"mean length {np.mean(ref['lengths']):.1f} vs {s.mean_length:.1f}"
    )
    ref_step = ref["wall"] / sum(ref["lengths"])
    ours = s.wall_time_s / s.env_steps
    print(
        f"per env step: (a) {ref_step * 1e3:.3f} ms; env.step {costs['plain'] * 1e3:.3f} ms plain, "
        f"{costs['fast'] * 1e3:.3f} ms fast, {costs['physics'] * 1e3:.3f} ms MuJoCo alone; "
        f"(b) {ours * 1e3:.3f} ms of wall time ({ours * evaluator.workers * 1e3:.3f} ms x {evaluator.workers} cores)"
    )
    print(
        f"CPU time: (a) {cpu_a:.2f} s, (b) {cpu_b:.2f} s over {evaluator.workers} processes; if (b) kept all "
        f"{evaluator.workers} cores busy (a quiet machine, no waiting) the speedup would be "
        f"{cpu_a / (cpu_b / evaluator.workers):.2f}x"
    )
    print(
        f"bound: {evaluator.workers} cores fully busy with fast steps cap (b) at "
        f"{ref_step / costs['fast'] * evaluator.workers:.1f}x, with MuJoCo alone at "
        f"{ref_step / costs['physics'] * evaluator.workers:.1f}x; load average {_load()}"
    )


def cpu_seconds(procs) -> float:
    """CPU time (user + system) used so far by this process (all its threads) and the given child processes.

    On a machine shared with other jobs, wall times mostly measure the competition; CPU times much less so.
    """
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for proc in procs:
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _load() -> str:
    """The 1/5/15-minute load averages (other processes competing for the cores skew every figure here)."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
