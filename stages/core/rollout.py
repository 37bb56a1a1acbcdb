"""Batched evaluation of an action-chunking policy in an OGBench single-task environment.

Pure library: knows nothing of the project's files or params. The public entry points are

* :func:`evaluate` -- make the environments, run the episodes, close everything;
* :class:`Evaluator` -- the same, but keeps its environments (and worker processes) alive so evaluation during
  training pays the start-up (worker interpreters, the first env of each process) only once.

How the episodes are run
------------------------
``num_envs`` environments run side by side, spread round-robin over ``workers`` processes: this one and
``workers - 1`` worker processes (fresh interpreters talking over socket pairs), all stepping their envs at once.
Every environment holds one episode at a time; when it finishes, it takes the next episode not yet started (the
order is fixed by episode lengths, hence reproducible). Episode ``j`` is reset with
``episode_seed(seed, j)``, so which environment or worker runs it does not matter.

The policy is called on a batch of observations and returns action chunks ``(n, h, d)``. Chunks are executed
open-loop: a worker runs an environment's whole chunk (stopping early, and dropping the rest of the chunk, when the
episode ends) before the policy is asked again. All environments therefore need a new chunk at the same moment, and
each decision point is ONE policy call over every environment that has an episode running, padded to a fixed batch
size (rows past the live ones repeat the first observation and are ignored) so that a jitted policy never
recompiles. Actions are clipped to [-1, 1].

An episode's success is ``info['success']`` at its last step (OGBench single-task envs end an episode on success or
at the time limit); its return is the sum of rewards and its length the number of env steps.

Where the time goes (the figures: README, "Benchmarks"; benchmarks/evaluation_speed.py, evaluate_stage.py)
-------------------------------------------------------------------------------------------------------------
* Env steps: OGBench manipulation envs are stepped by :class:`stages.core.fast_env.ManipStepper`, bitwise the same
  observations, rewards, flags and successes as ``gymnasium.make(env_id)`` without its wrappers and info dicts;
  most of a step is MuJoCo's physics substeps, then OGBench's end-effector controller (its IK).
* Start-up: worker processes are fresh interpreters (imports, then their first env); the other envs of a process
  are clones of its first (:func:`stages.core.fast_env.clone_env`, much cheaper than making one). Workers are only
  waited for at the first command, so ``run(..., warm_up=True)`` compiles a jitted policy meanwhile.
* Policy: one batched call per chunk; with ``pipeline=True`` half of the envs step while the policy computes the
  other half's chunks (JAX's asynchronous dispatch), which hides its compute time behind env steps.
* Videos: with software EGL (llvmpipe) a frame costs more CPU than the env steps it shows (OGBench's arm meshes are
  drawn for the image and, with shadows, for the shadow map); ``video_processes`` replays such episodes elsewhere
  so they do not stall the others.
* Every interpreter started pays its imports (far more without bytecode caches, e.g. under
  PYTHONDONTWRITEBYTECODE=1) and its first env, so on two cores an extra process costs CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np

from stages.core.ogbench_names import registered_env_ids, resolve_env_id

Policy = Callable[[np.ndarray, Any], Any]
"""``policy(observations (n, *obs_shape), key) -> actions (n, h, d)``; see :meth:`Evaluator.run` for ``key``."""

KeyMode = Literal["call", "row"]

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
TIMELINE_ENV = "RQL_EVAL_TIMELINE"  # a file: Evaluator.run appends "<event>\t<unix time>" lines (benchmarks)
EVAL_SEED = 1_000_000  # base seed of evaluation episodes (run seed added), apart from training seeds; the evaluate
# stage and the evaluations during training use the same episodes


# --------------------------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------------------------


def episode_seed(base_seed: int, episode: int) -> int:
    """The environment reset seed of episode ``episode``: a hash of ``(base_seed, episode)`` in [0, 2**32)."""
    if base_seed < 0 or episode < 0:
        raise ValueError(
            f"seed and episode index must be non-negative, got seed={base_seed}, episode={episode}"
        )
    return int(np.random.SeedSequence([int(base_seed), int(episode)]).generate_state(1, dtype=np.uint32)[0])


def _mark(event: str) -> None:
    """Append ``event`` and the wall-clock time to the file named by $RQL_EVAL_TIMELINE, if set (for benchmarks that
    time a whole process: start-up up to the first finished episode, the rollout, the video)."""
    path = os.environ.get(TIMELINE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{event}\t{time.time():.6f}\n")


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for the default ``z``).

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not degenerate at 0 or ``trials`` successes,
    which matters for success rates near 0% or 100% over ~50 episodes.
    """
    if trials <= 0:
        raise ValueError(f"need at least one trial for an interval, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1.0 - p) / trials + z * z / (4 * trials * trials)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeResult:
    """One episode: its index, reset seed, outcome, and the number of policy queries it used."""

    episode: int
    seed: int
    success: bool
    episode_return: float
    length: int
    policy_queries: int


@dataclass(frozen=True)
class EvalSummary:
    """Aggregate over the episodes of one evaluation.

    ``success_ci95`` is the Wilson score 95% interval of the success rate. ``policy_calls`` counts batched calls;
    ``wall_time_s`` is the rollout time, ``policy_time_s`` the part of it spent in the policy (its calls and output
    checks); ``setup_time_s`` is the time spent making environments and starting workers before it (0 when an
    :class:`Evaluator` reuses them) and ``warm_up_time_s`` that of the warm-up policy call (overlapping the workers'
    start-up; 0 without one).
    """

    episodes: int
    successes: int
    success_rate: float
    success_ci95: tuple[float, float]
    mean_return: float
    mean_length: float
    env_steps: int
    policy_calls: int
    wall_time_s: float
    setup_time_s: float
    env_steps_per_s: float
    episodes_per_s: float
    policy_time_s: float = 0.0
    warm_up_time_s: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    """Everything an evaluation produced. ``videos`` maps an episode index to its frames, uint8 (T, H, W, 3)."""

    env_id: str
    summary: EvalSummary
    episodes: tuple[EpisodeResult, ...]
    videos: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready summary and per-episode records (videos are left out)."""
        summary = asdict(self.summary)
        summary["success_ci95"] = list(self.summary.success_ci95)
        return {"env_id": self.env_id, "summary": summary, "episodes": [asdict(e) for e in self.episodes]}


def summarize(
    episodes: Sequence[EpisodeResult],
    wall_time_s: float,
    policy_calls: int,
    setup_time_s: float = 0.0,
    policy_time_s: float = 0.0,
    warm_up_time_s: float = 0.0,
) -> EvalSummary:
    """Summary statistics of finished episodes (success rate with its Wilson 95% interval, means, throughput)."""
    if not episodes:
        raise ValueError("no episodes to summarize")
    n = len(episodes)
    successes = sum(bool(e.success) for e in episodes)
    steps = sum(e.length for e in episodes)
    wall = max(float(wall_time_s), 1e-9)
    return EvalSummary(
        episodes=n,
        successes=successes,
        success_rate=successes / n,
        success_ci95=wilson_interval(successes, n),
        mean_return=float(np.mean([e.episode_return for e in episodes])),
        mean_length=float(np.mean([e.length for e in episodes])),
        env_steps=int(steps),
        policy_calls=int(policy_calls),
        wall_time_s=float(wall_time_s),
        setup_time_s=float(setup_time_s),
        env_steps_per_s=steps / wall,
        episodes_per_s=n / wall,
        policy_time_s=float(policy_time_s),
        warm_up_time_s=float(warm_up_time_s),
    )


# --------------------------------------------------------------------------------------------------------------------
# Environments: a group of envs stepped chunk by chunk (used in this process or inside a worker process)
# --------------------------------------------------------------------------------------------------------------------


def _make_env(env_id: str, render_size: tuple[int, int], env_kwargs: dict):
    import gymnasium

    registered_env_ids()  # imports ogbench, which registers its environments
    width, height = render_size
    return gymnasium.make(env_id, width=width, height=height, **env_kwargs)


def _make_envs(env_id: str, count: int, render_size: tuple[int, int], env_kwargs: dict) -> list:
    """``count`` envs: the first made by gymnasium, the others cloned from it when it is an OGBench manipulation env
    (:func:`stages.core.fast_env.clone_env`, much cheaper than making one), else made too."""
    from stages.core.fast_env import clone_env

    first = _make_env(env_id, render_size, env_kwargs)
    envs = [first]
    for _ in range(count - 1):
        try:
            envs.append(clone_env(first))
        except (ValueError, NotImplementedError, TypeError):  # not clonable: make it (same env, slower)
            envs.append(_make_env(env_id, render_size, env_kwargs))
    return envs


class _EnvGroup:
    """Environments that run one episode each at a time; stepped a whole chunk per command.

    Each env is stepped through a :mod:`stages.core.fast_env` stepper: for OGBench's manipulation envs (with
    ``fast_env=True``) one that skips OGBench's info-dict bookkeeping and gymnasium's wrappers, with bitwise the same
    observations, rewards, flags and successes; for any other env the gymnasium env itself.
    """

    def __init__(
        self,
        env_id: str,
        count: int,
        render_size: tuple[int, int],
        env_kwargs: dict,
        fast_env: bool = True,
        shadow_size: int | None = None,
    ):
        from stages.core.fast_env import make_stepper

        self.envs = _make_envs(env_id, count, render_size, env_kwargs)
        self.steppers = [make_stepper(env, fast=fast_env) for env in self.envs]
        self.steps = [0] * count
        self.limit = [0] * count
        self.frame_skip = [0] * count  # 0: not recording
        self.shadow_size = shadow_size

    def spaces(self) -> dict:
        """Observation shape/dtype, action dim, time limit of the environments and whether they step fast."""
        env = self.envs[0]
        return {
            "obs_shape": tuple(env.observation_space.shape),
            "obs_dtype": str(env.observation_space.dtype),
            "action_dim": int(np.prod(env.action_space.shape)),
            "time_limit": env.spec.max_episode_steps if env.spec is not None else None,
            "fast": bool(self.steppers[0].fast),
        }

    def _frame(self, i: int) -> np.ndarray:
        model = getattr(self.envs[i].unwrapped, "_model", None)
        if self.shadow_size == 0 and model is not None:
            model.light_castshadow[:] = False  # rendering only: the physics never reads it
        elif self.shadow_size and getattr(self.envs[i].unwrapped, "_renderer", False) is None and model is not None:
            model.vis.quality.shadowsize = self.shadow_size  # read when the renderer (GL context) is made
        try:
            return np.asarray(self.envs[i].render(), dtype=np.uint8).copy()
        except Exception as exc:  # mujoco raises a variety of GL errors
            raise RuntimeError(
                f"rendering failed ({type(exc).__name__}: {exc}); headless rendering needs MUJOCO_GL=egl set "
                "before mujoco is first imported"
            ) from exc

    def reset(self, items: Sequence[tuple[int, int, int, int]]) -> list[tuple[int, np.ndarray, list]]:
        """Reset envs: items are (local index, seed, step limit, frame skip or 0)."""
        out = []
        for i, seed, limit, frame_skip in items:
            obs = self.steppers[i].reset(seed)
            self.steps[i], self.limit[i], self.frame_skip[i] = 0, limit, frame_skip
            frames = [self._frame(i)] if frame_skip else []
            out.append((i, np.asarray(obs), frames))
        return out

    def run_chunks(self, items: Sequence[tuple[int, np.ndarray]]) -> list[tuple]:
        """Execute each env's chunk open-loop until it is used up or the episode ends.

        Returns per env: (local index, last observation, reward sum, steps taken, done, success at the last step,
        frames).
        """
        out = []
        for i, chunk in items:
            step, reward_sum, taken, done, success, frames = self.steppers[i].step, 0.0, 0, False, False, []
            for action in chunk:
                obs, reward, terminated, truncated, success = step(action)
                self.steps[i] += 1
                taken += 1
                reward_sum += float(reward)
                done = terminated or truncated or self.steps[i] >= self.limit[i]
                skip = self.frame_skip[i]
                if skip and (self.steps[i] % skip == 0 or done):
                    frames.append(self._frame(i))
                if done:
                    break
            out.append((i, np.asarray(obs), reward_sum, taken, done, success, frames))
        return out

    def replay(self, seed: int, limit: int, frame_skip: int, chunks: list, part: int = 0, parts: int = 1) -> tuple:
        """Re-run an episode on env 0 from its reset seed and its executed chunks, rendering its frames: those of
        index ``part``, ``part + parts``, ... (every frame with ``parts=1``) of the frames :meth:`reset` and
        :meth:`run_chunks` render (same stepper, same states, so the same images).

        Returns (return, steps taken, done, success, last observation, frames), the return summed chunk by chunk
        as the evaluator sums it, for the caller to check the replay against the episode.
        """
        stepper = self.steppers[0]
        obs = stepper.reset(seed)
        frames, count = [], 0

        def frame() -> None:
            nonlocal count
            if count % parts == part:
                frames.append(self._frame(0))
            count += 1

        frame()
        ret, taken, done, success = 0.0, 0, False, False
        for chunk in chunks:
            reward_sum = 0.0
            for action in chunk:
                obs, reward, terminated, truncated, success = stepper.step(action)
                taken += 1
                reward_sum += float(reward)
                done = terminated or truncated or taken >= limit
                if taken % frame_skip == 0 or done:
                    frame()
                if done:
                    break
            ret += reward_sum
            if done:
                break
        return ret, taken, done, success, np.asarray(obs), frames

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _serve(conn, group: _EnvGroup) -> None:
    """Answer (command, payload) messages for ``group`` until 'close' or the parent goes away."""
    while True:
        command, payload = conn.recv()
        if command == "close":
            return
        if command == "reset":
            conn.send(("ok", group.reset(payload)))
        elif command == "run":
            conn.send(("ok", group.run_chunks(payload)))
        elif command == "replay":
            conn.send(("ok", group.replay(*payload)))
        else:
            conn.send(("error", f"unknown command {command!r}"))


def _worker_entry(fd: int) -> None:
    """Entry point of a worker process: receive its configuration on ``fd``, build the envs, serve commands.

    It first asks the kernel to kill it when its parent dies (a killed stage leaves no env process behind).
    """
    from stages.core.parent_watch import die_with_parent

    die_with_parent()
    os.environ.setdefault("MUJOCO_GL", "egl")
    conn = Connection(fd)
    group = None
    try:
        env_id, count, render_size, env_kwargs, fast_env, shadow_size = conn.recv()
        group = _EnvGroup(env_id, count, render_size, env_kwargs, fast_env, shadow_size)
        conn.send(("ok", group.spaces()))
        _serve(conn, group)
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:  # noqa: BLE001 -- any failure is reported to the parent, which raises it
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if group is not None:
            group.close()
        conn.close()


_WORKER_CODE = "import sys; from stages.core.rollout import _worker_entry; _worker_entry(int(sys.argv[1]))"


def _start_worker(config: tuple) -> tuple[Connection, subprocess.Popen]:
    """Start a worker process running :func:`_worker_entry` on one end of a socket pair; send it ``config``.

    A fresh interpreter (not multiprocessing's spawn, which re-imports the caller's ``__main__``) that imports this
    very copy of the package, so a worker never pays for the caller's imports.
    """
    parent_sock, child_sock = socket.socketpair()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),),
            env=env,
        )
    finally:
        child_sock.close()
    conn = Connection(parent_sock.detach())
    conn.send(config)
    return conn, proc


def _stop_workers(conns: list[Connection], procs: list[subprocess.Popen]) -> None:
    """Ask workers to close, wait for them, and terminate any that do not exit.

    Our ends are closed right after the request (a worker still reads it), so a worker blocked sending a reply
    nobody will read (a video after an error) fails at once instead of holding up the wait.
    """
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(("close", None))
        conn.close()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=5)


class _Backend:
    """Environment groups stepped concurrently: group 0 in this process (``local``) or in a worker process, groups
    1.. in worker processes; optionally worker processes that only replay and render video episodes.

    Workers are started first (before this process builds its own envs); their readiness is only awaited by
    :meth:`wait_ready` (called by the first command, or for the spaces when no group is local), so the caller can
    do other start-up work -- import and compile its policy -- meanwhile.
    """

    def __init__(
        self,
        env_id: str,
        counts: list[int],
        render_size: tuple[int, int],
        env_kwargs: dict,
        fast_env: bool,
        shadow_size: int | None,
        local: bool = True,
        renderers: int = 0,
    ):
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen] = []
        self.broken = False
        self.offset = 1 if local else 0  # group w runs in worker process w - offset (conns, procs)
        self.local: _EnvGroup | None = None
        self.renderers: list[list] = []  # video processes: [connection, process, start-up message read]
        self._spaces: dict | None = None
        self._finalizer = weakref.finalize(self, _stop_workers, self.conns, self.procs)
        try:
            for count in counts[self.offset :]:  # start the workers first: they build their envs while we work
                conn, proc = _start_worker((env_id, count, render_size, env_kwargs, fast_env, shadow_size))
                self.conns.append(conn)
                self.procs.append(proc)
            for _ in range(renderers):  # after the stepping workers, so they do not delay them
                conn, proc = _start_worker((env_id, 1, render_size, env_kwargs, fast_env, shadow_size))
                self.conns.append(conn)
                self.procs.append(proc)
                self.renderers.append([conn, proc, False])
            if local:
                self.local = _EnvGroup(env_id, counts[0], render_size, env_kwargs, fast_env, shadow_size)
                self._spaces = self.local.spaces()
        except BaseException:
            self.close()
            raise
        self._pending = list(range(self.offset, len(counts)))

    def wait_ready(self) -> None:
        """Wait until every worker has built its environments (raising a worker's start-up error)."""
        try:
            while self._pending:
                self._check_spaces(self._receive(self._pending[0]))
                self._pending.pop(0)
        except BaseException:
            self.broken = True
            raise

    def _check_spaces(self, spaces: dict) -> None:
        if self._spaces is None:
            self._spaces = spaces
        elif spaces != self._spaces:
            raise RuntimeError(f"rollout worker envs differ from the others: {spaces} != {self._spaces}")

    def _receive(self, worker: int):
        return self._receive_on(self.conns[worker - self.offset], self.procs[worker - self.offset], f"{worker}")

    @staticmethod
    def _receive_on(conn: Connection, proc: subprocess.Popen, name: str):
        try:
            status, payload = conn.recv()
        except EOFError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            raise RuntimeError(
                f"rollout worker {name} died (exit code {proc.returncode}); see its output above"
            ) from None
        if status != "ok":
            raise RuntimeError(f"rollout worker {name} failed:\n{payload}")
        return payload

    def spaces(self) -> dict:
        """Observation and action spaces of the envs (waits for the workers when no group is local)."""
        if self._spaces is None:
            self.wait_ready()
        return self._spaces

    def spaces_known(self) -> bool:
        return self._spaces is not None

    def call(self, command: str, per_worker: list[list]) -> list[list]:
        """Run ``command`` with each group's items: remote groups first (sent), then the local one, then collect.

        Any failure here leaves replies in flight or envs mid-chunk, so the backend is marked broken.
        """
        if self.broken:
            raise RuntimeError("an earlier environment step failed; close this Evaluator and make a new one")
        self.wait_ready()
        try:
            busy = [w for w in range(self.offset, len(per_worker)) if per_worker[w]]
            for w in busy:
                self.conns[w - self.offset].send((command, per_worker[w]))
            results: list[list] = [[] for _ in per_worker]
            if self.local is not None and per_worker[0]:
                method = self.local.reset if command == "reset" else self.local.run_chunks
                results[0] = method(per_worker[0])
            for w in busy:
                results[w] = self._receive(w)
        except BaseException:
            self.broken = True
            raise
        return results

    # -- video processes: requests are sent at once, replies collected when they are there (or at the end) -------
    def send_replay(self, seed: int, limit: int, frame_skip: int, chunks: list) -> None:
        """Ask the video processes to replay an episode, each rendering its share of the frames."""
        for part, (conn, _, _) in enumerate(self.renderers):
            conn.send(("replay", (seed, limit, frame_skip, chunks, part, len(self.renderers))))

    def replay_ready(self) -> bool:
        """Whether every video process's reply to the oldest request can be read without waiting."""
        for i, (conn, _, ready) in enumerate(self.renderers):
            if not ready:
                if not conn.poll():
                    return False
                self._renderer_started(i)
            if not conn.poll():
                return False
        return True

    def _renderer_started(self, i: int) -> None:
        """Read video process i's start-up message (the spaces of its env), which comes before its replies."""
        conn, proc, _ = self.renderers[i]
        self._check_spaces(self._receive_on(conn, proc, f"(video {i})"))
        self.renderers[i][2] = True

    def receive_replay(self) -> tuple:
        """The oldest replay, its parts put together: (return, steps taken, done, success, last observation,
        frames); waits for it."""
        try:
            parts = []
            for i, (conn, proc, ready) in enumerate(self.renderers):
                if not ready:
                    self._renderer_started(i)
                parts.append(self._receive_on(conn, proc, f"(video {i})"))
        except BaseException:
            self.broken = True
            raise
        n, frames = len(parts), [None] * sum(len(part[-1]) for part in parts)
        for i, part in enumerate(parts):
            frames[i::n] = part[-1]
        return (*parts[0][:-1], frames)

    def close(self) -> None:
        self._finalizer()
        if getattr(self, "local", None) is not None:
            self.local.close()
            self.local = None


# --------------------------------------------------------------------------------------------------------------------
# Policy calls: keys and output checks
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def _key_functions():
    """Jitted key derivations, made once per process (a new jit wrapper per evaluation would recompile)."""
    import jax

    def fold_rows(base, episodes, queries):
        return jax.vmap(lambda e, q: jax.random.fold_in(jax.random.fold_in(base, e), q))(episodes, queries)

    def fold_calls(base, first, count: int):
        return jax.vmap(lambda i: jax.random.fold_in(base, i))(first + jnp.arange(count, dtype=jnp.uint32))

    import jax.numpy as jnp

    return jax.jit(fold_calls, static_argnums=2), jax.jit(fold_rows)


class _Keys:
    """Deterministic PRNG keys for policy calls (raw uint32 ``jax.random.PRNGKey``-style keys).

    'call' keys are ``fold_in(base, call_index)``, derived in blocks of :attr:`BLOCK` calls by one vmapped call and
    handed out as numpy arrays (one device round trip per block instead of one jitted dispatch per policy call).
    """

    BLOCK = 256

    def __init__(self, seed: int, mode: KeyMode, batch_size: int):
        import jax

        if mode not in ("call", "row"):
            raise ValueError(f"key_mode must be 'call' or 'row', got {mode!r}")
        self.mode = mode
        self.base = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5EED)
        self.batch_size = batch_size
        self._fold_calls, self._fold_rows = _key_functions()
        self._block_start: int | None = None
        self._block: np.ndarray | None = None

    def __call__(self, call_index: int, episodes: np.ndarray, queries: np.ndarray):
        """The key for batched call ``call_index``; rows are (episode, query-within-episode) pairs in 'row' mode."""
        if self.mode == "call":
            start = call_index - call_index % self.BLOCK
            if self._block_start != start:
                self._block = np.asarray(self._fold_calls(self.base, np.uint32(start), self.BLOCK))
                self._block_start = start
            return self._block[call_index - start].copy()
        e = np.zeros(self.batch_size, np.uint32)
        q = np.zeros(self.batch_size, np.uint32)
        e[: len(episodes)], q[: len(queries)] = episodes, queries
        return self._fold_rows(self.base, e, q)


def check_actions(
    actions: Any, batch_size: int, action_dim: int, live: int, horizon: int | None
) -> np.ndarray:
    """Validate a policy's output and return the live rows' chunks clipped to [-1, 1], as float64 (live, h, d).

    Raises:
        ValueError: wrong rank/shape (naming the expected and received shapes), a chunk length different from
            earlier calls, a non-float dtype, or non-finite values in the live rows.
    """
    try:
        arr = np.asarray(actions)
    except Exception as exc:
        raise ValueError(
            f"policy output of type {type(actions).__name__} is not convertible to an array"
        ) from exc
    expected = (
        f"({batch_size}, h, {action_dim})" if horizon is None else f"({batch_size}, {horizon}, {action_dim})"
    )
    if arr.ndim != 3 or arr.shape[0] != batch_size or arr.shape[2] != action_dim or arr.shape[1] < 1:
        raise ValueError(
            f"policy returned actions of shape {arr.shape}, expected {expected} "
            f"(padded batch size, chunk length h >= 1, action dim)"
        )
    if horizon is not None and arr.shape[1] != horizon:
        raise ValueError(
            f"policy returned chunks of length {arr.shape[1]}, but earlier calls returned {horizon}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"policy returned actions of dtype {arr.dtype}, expected a floating dtype")
    used = arr[:live]
    if not np.all(np.isfinite(used)):
        bad = np.argwhere(~np.isfinite(used))[0]
        raise ValueError(f"policy returned a non-finite action (row {bad[0]}, step {bad[1]}, dim {bad[2]})")
    return np.clip(used, -1.0, 1.0).astype(np.float64)


# --------------------------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """The episode an environment is running and its running totals."""

    episode: int | None = None
    obs: np.ndarray | None = None
    ret: float = 0.0
    length: int = 0
    queries: int = 0
    frames: list = field(default_factory=list)
    actions: list | None = None  # the executed chunks, for a video episode replayed by the video process


def pipeline_groups(num_envs: int, workers: int, pipeline: bool) -> list[list[int]]:
    """The env slots queried together: all of them, or with ``pipeline`` two groups that each hold about half of
    every worker's envs (slot ``s`` runs on worker ``s % workers`` as its ``s // workers``-th env).

    Raises:
        ValueError: ``pipeline`` with fewer than two envs per worker.
    """
    if not pipeline:
        return [list(range(num_envs))]
    if num_envs < 2 * workers:
        raise ValueError(f"pipeline needs num_envs >= 2 * workers (two envs per worker), got {num_envs} envs "
                         f"for {workers} workers")
    return [[s for s in range(num_envs) if (s // workers) % 2 == g] for g in (0, 1)]


def _split_round_robin(count: int, workers: int) -> list[int]:
    return [len(range(w, count, workers)) for w in range(workers)]


class Evaluator:
    """Environments (and worker processes) for repeated evaluations of one OGBench env.

    Args:
        env_name: env id or task name (see :func:`resolve_env_id`).
        num_envs: environments run side by side (default ``2 * workers``); also the default padded batch size.
        workers: processes stepping the environments: with ``in_process`` this one included (``workers - 1``
            worker processes are started, and this process steps its share of the environments while they step
            theirs), else ``workers`` worker processes and this process steps none.
        in_process: whether this process steps a share of the environments. False leaves this process free for
            its own start-up (importing and compiling the policy) while the workers build every env, and the
            constructor returns at once; which process steps an env does not change results.
        video_processes: render video episodes in this many more worker processes (0: in the env that runs
            them), which replay each once it has ended from its reset seed and executed actions, every process
            rendering its share of the frames (the same frames): rendering then overlaps
            the other episodes instead of holding up every env at each chunk. The replay is checked against
            the episode (return, length, success, last observation).
        render_size: (width, height) of rendered video frames.
        shadow_size: shadow map size (pixels a side) for video frames of MuJoCo envs that use shadows; None keeps
            the model's (OGBench: 4096); 0 renders without shadows (no light casts one), much cheaper with headless
            software rendering (EGL on llvmpipe, no GPU; see benchmarks/evaluate_stage.py). Only rendering is
            affected.
        env_kwargs: extra keyword arguments for ``gymnasium.make``.
        fast_env: step OGBench manipulation envs with :class:`stages.core.fast_env.ManipStepper` (bitwise the same
            outputs in less time per step); False steps the gymnasium env itself.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        env_name: str,
        *,
        num_envs: int | None = None,
        workers: int = 1,
        render_size: tuple[int, int] = (200, 200),
        env_kwargs: dict | None = None,
        fast_env: bool = True,
        shadow_size: int | None = 1024,
        in_process: bool = True,
        video_processes: int = 0,
    ):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if not isinstance(video_processes, int) or video_processes < 0:
            raise ValueError(f"video_processes must be an integer >= 0, got {video_processes!r}")
        num_envs = 2 * workers if num_envs is None else num_envs
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if workers > num_envs:
            raise ValueError(f"workers ({workers}) must not exceed num_envs ({num_envs})")
        if len(render_size) != 2 or min(render_size) < 1:
            raise ValueError(f"render_size must be (width, height) with positive sizes, got {render_size!r}")
        if shadow_size is not None and (not isinstance(shadow_size, int) or shadow_size < 0):
            raise ValueError(f"shadow_size must be an integer >= 0 or None, got {shadow_size!r}")
        self.env_id = resolve_env_id(env_name)
        self.num_envs = num_envs
        self.workers = workers
        start = time.perf_counter()
        kwargs = dict(env_kwargs or {})
        size = (int(render_size[0]), int(render_size[1]))
        counts = _split_round_robin(num_envs, workers)
        self._backend = _Backend(
            self.env_id, counts, size, kwargs, bool(fast_env), shadow_size, bool(in_process), video_processes
        )
        self._setup_time = time.perf_counter() - start
        self._closed = False

    # -- the envs' spaces (known once the envs exist: at once with in_process, else from the first worker) -------
    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self._backend.spaces()["obs_shape"]

    @property
    def obs_dtype(self) -> np.dtype:
        return np.dtype(self._backend.spaces()["obs_dtype"])

    @property
    def action_dim(self) -> int:
        return self._backend.spaces()["action_dim"]

    @property
    def time_limit(self) -> int | None:
        return self._backend.spaces()["time_limit"]

    @property
    def fast_env(self) -> bool:
        return self._backend.spaces()["fast"]

    # -- slot <-> (worker, local index) ---------------------------------------------------------------------------
    def _place(self, slot: int) -> tuple[int, int]:
        return slot % self.workers, slot // self.workers

    def _dispatch(self, command: str, items: list[tuple[int, Any]]) -> dict[int, tuple]:
        """Send (slot, payload...) items to their workers at once; return results keyed by slot."""
        per_worker: list[list] = [[] for _ in range(self.workers)]
        for slot, *payload in items:
            worker, local = self._place(slot)
            per_worker[worker].append((local, *payload))
        out: dict[int, tuple] = {}
        for worker, results in enumerate(self._backend.call(command, per_worker)):
            for local, *rest in results:
                out[local * self.workers + worker] = tuple(rest)
        return out

    def run(
        self,
        policy: Policy,
        *,
        episodes: int = 50,
        seed: int = 0,
        batch_size: int | None = None,
        key_mode: KeyMode = "call",
        max_episode_steps: int | None = None,
        video_episodes: int = 0,
        frame_skip: int = 3,
        progress: bool = False,
        warm_up: bool = False,
        pipeline: bool = False,
        obs_shape: tuple[int, ...] | None = None,
    ) -> EvalResult:
        """Run ``episodes`` episodes of ``policy`` and summarize them.

        Args:
            policy: ``policy(observations, key) -> actions``. ``observations`` is (batch_size, *obs_shape), float32
                for float observation spaces; ``actions`` must be (batch_size, h, action_dim), floating, with h the
                same on every call. Only the first rows (envs with a running episode) are used.
            episodes: number of episodes; episode j is reset with ``episode_seed(seed, j)``.
            seed: base seed for env resets and policy keys.
            batch_size: padded batch size of every policy call (default ``num_envs``; must be >= it).
            key_mode: ``'call'``: ``key`` is one raw PRNG key (shape (2,), uint32) per batched call, folded from
                (seed, call number) -- results are the same for any ``workers``, but a stochastic policy's results
                depend on ``num_envs``. ``'row'``: ``key`` is a (batch_size, 2) array with one key per row, folded
                from (seed, episode, query number within the episode) -- a policy drawing each row's noise from its
                row key gives the same results for any ``num_envs`` and ``workers``.
            max_episode_steps: truncate episodes after this many steps (at most the env's own time limit).
            video_episodes: render the first k episodes (by index) into ``EvalResult.videos``.
            frame_skip: keep every ``frame_skip``-th frame of a rendered episode (and its first and last).
            progress: show a tqdm progress bar over finished episodes.
            warm_up: first call the policy once on a zero batch (output discarded) before waiting for the worker
                processes, so that compiling a jitted policy overlaps their start-up (for the first run of a fresh
                Evaluator). The policy sees one call more than ``policy_calls``.
            pipeline: split the environments in two groups (each spread over all workers, so ``num_envs`` must be
                at least ``2 * workers``) and query the policy for one group while the other executes its chunks.
                This hides the policy's compute time when the policy returns before its result is computed (JAX's
                asynchronous dispatch: return the jax array, do not convert it to numpy); the policy is then called
                with batches of ``num_envs / 2`` rows. With a policy that computes synchronously it only halves the
                batches. In 'call' key mode a stochastic policy's results differ with and without it.
            obs_shape: the observation shape, if known beforehand: lets the warm-up call (float32 zeros) run
                before the worker processes have reported their envs (``in_process=False``); checked against them.
        """
        if self._closed:
            raise RuntimeError("this Evaluator is closed")
        _check_positive("episodes", episodes)
        _check_positive("frame_skip", frame_skip)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(video_episodes, int) or not 0 <= video_episodes <= episodes:
            raise ValueError(
                f"video_episodes must be an integer in [0, episodes={episodes}], got {video_episodes!r}"
            )
        groups = pipeline_groups(self.num_envs, self.workers, pipeline)
        group_size = max(len(g) for g in groups)
        batch_size = group_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < group_size:
            what = "num_envs" if len(groups) == 1 else "the pipeline's group size"
            raise ValueError(f"batch_size must be an integer >= {what} ({group_size}), got {batch_size!r}")
        if max_episode_steps is not None:
            _check_positive("max_episode_steps", max_episode_steps)
        if not callable(policy):
            raise TypeError(f"policy must be callable, got {type(policy).__name__}")
        if obs_shape is not None:
            obs_shape = tuple(int(n) for n in obs_shape)

        keys = _Keys(int(seed), key_mode, batch_size)
        warm_up_time = 0.0
        if warm_up:
            shape = obs_shape if obs_shape is not None and not self._backend.spaces_known() else None
            if shape is None:  # from the envs (waits for the workers when none is local)
                shape = self.obs_shape
                dtype = np.float32 if np.issubdtype(self.obs_dtype, np.floating) else self.obs_dtype
            else:
                dtype = np.float32
            begin = time.perf_counter()
            policy(np.zeros((batch_size, *shape), dtype), keys(0, np.zeros(0, np.uint32), np.zeros(0, np.uint32)))
            warm_up_time = time.perf_counter() - begin
            _mark("warm-up done")
        begin = time.perf_counter()
        self._backend.wait_ready()
        setup_time = self._setup_time + time.perf_counter() - begin
        self._setup_time = 0.0
        _mark("envs ready")
        if obs_shape is not None and obs_shape != self.obs_shape:
            raise ValueError(f"obs_shape {obs_shape} given, but the envs' observations are {self.obs_shape}")
        limit = self.time_limit if max_episode_steps is None else max_episode_steps
        if limit is None:
            raise ValueError(f"{self.env_id} has no time limit: pass max_episode_steps")
        if self.time_limit is not None and limit > self.time_limit:
            raise ValueError(
                f"max_episode_steps={limit} exceeds the time limit of {self.env_id} ({self.time_limit})"
            )
        obs_dtype = np.float32 if np.issubdtype(self.obs_dtype, np.floating) else self.obs_dtype
        batch = np.zeros((batch_size, *self.obs_shape), dtype=obs_dtype)
        replay = bool(self._backend.renderers)  # video episodes: rendered by the video processes
        replays: list[tuple[EpisodeResult, np.ndarray]] = []  # (episode, last obs) sent, frames not back yet
        start = time.perf_counter()
        policy_time = 0.0
        slots = [_Slot() for _ in range(self.num_envs)]
        results: dict[int, EpisodeResult] = {}
        videos: dict[int, np.ndarray] = {}
        next_episode = 0
        calls = 0
        horizon: int | None = None
        bar = _progress_bar(episodes, self.env_id) if progress else None

        def start_episodes(free: list[int]) -> None:
            nonlocal next_episode
            items = []
            for s in free:
                if next_episode >= episodes:
                    slots[s] = _Slot()
                    continue
                j = next_episode
                next_episode += 1
                slots[s] = _Slot(episode=j, actions=[] if replay and j < video_episodes else None)
                record = j < video_episodes and not replay
                items.append((s, episode_seed(seed, j), limit, frame_skip if record else 0))
            for s, (obs, frames) in self._dispatch("reset", items).items():
                slots[s].obs = obs
                slots[s].frames.extend(frames)

        def query(group: list[int]):
            """Call the policy on the group's running envs; returns (its output, the slots of its rows) or None."""
            nonlocal calls, policy_time
            live = [s for s in group if slots[s].episode is not None]
            if not live:
                return None
            for row, s in enumerate(live):
                batch[row] = slots[s].obs
            batch[len(live) :] = batch[0]
            key = keys(
                calls,
                np.array([slots[s].episode for s in live], np.uint32),
                np.array([slots[s].queries for s in live], np.uint32),
            )
            calls += 1
            begin = time.perf_counter()
            actions = policy(batch.copy(), key)  # a fresh array: the policy may keep or alias its input
            policy_time += time.perf_counter() - begin
            return actions, live

        def execute(actions, live: list[int]) -> None:
            """Check the policy's output, run the chunks, book the results and start new episodes in freed slots."""
            nonlocal horizon, policy_time
            begin = time.perf_counter()
            chunks = check_actions(actions, batch_size, self.action_dim, len(live), horizon)  # waits for them
            policy_time += time.perf_counter() - begin
            horizon = chunks.shape[1]
            outcome = self._dispatch("run", [(s, chunks[row]) for row, s in enumerate(live)])
            finished = []
            for row, s in enumerate(live):
                obs, reward_sum, taken, done, success, frames = outcome[s]
                slot = slots[s]
                slot.obs = obs
                slot.ret += reward_sum
                slot.length += taken
                slot.queries += 1
                slot.frames.extend(frames)
                if slot.actions is not None:
                    slot.actions.append(chunks[row][:taken])
                if done:
                    j = slot.episode
                    if not results:
                        _mark("first episode end")
                    results[j] = EpisodeResult(j, episode_seed(seed, j), success, slot.ret, slot.length, slot.queries)
                    if slot.frames:
                        videos[j] = np.stack(slot.frames)
                    if slot.actions is not None:
                        self._backend.send_replay(results[j].seed, limit, frame_skip, slot.actions)
                        replays.append((results[j], obs))
                    finished.append(s)
                    if bar is not None:
                        bar.update(1)
            if finished:
                start_episodes(finished)
            while replays and self._backend.replay_ready():  # so the video process never waits for us to read
                collect_replay()

        def collect_replay() -> None:
            """Receive the oldest replay's frames, checking that the replay reproduced its episode."""
            ret, taken, done, success, last, frames = self._backend.receive_replay()
            original, original_last = replays.pop(0)
            same = (ret, taken, done, success) == (original.episode_return, original.length, True, original.success)
            if not (same and np.array_equal(last, original_last)):
                self._backend.broken = True
                raise RuntimeError(
                    f"the replay of episode {original.episode} for its video diverged from the episode "
                    f"(return {ret} vs {original.episode_return}, length {taken} vs {original.length}, same last "
                    f"observation: {np.array_equal(last, original_last)})"
                )
            videos[original.episode] = np.stack(frames)

        try:
            start_episodes(list(range(self.num_envs)))
            pending = [query(group) for group in groups]
            while any(p is not None for p in pending):
                for g, group in enumerate(groups):  # one group's policy output is computed while the others step
                    if pending[g] is not None:
                        execute(*pending[g])
                        pending[g] = query(group)
            _mark("episodes done")
            while replays:  # the video process's last frames
                collect_replay()
            _mark("videos done")
        except BaseException:
            if replays:  # their replies would come to the next run
                self._backend.broken = True
            raise
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - start
        ordered = tuple(results[j] for j in range(episodes))
        summary = summarize(ordered, wall, calls, setup_time, policy_time, warm_up_time)
        return EvalResult(self.env_id, summary, ordered, videos)

    def close(self) -> None:
        """Close the environments and stop the worker processes."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _progress_bar(total: int, env_id: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"eval {env_id}", unit="ep", dynamic_ncols=True)


def evaluate(
    policy: Policy,
    env_name: str,
    *,
    episodes: int = 50,
    seed: int = 0,
    num_envs: int | None = None,
    workers: int = 1,
    batch_size: int | None = None,
    key_mode: KeyMode = "call",
    max_episode_steps: int | None = None,
    video_episodes: int = 0,
    frame_skip: int = 3,
    render_size: tuple[int, int] = (200, 200),
    env_kwargs: dict | None = None,
    progress: bool = False,
    warm_up: bool = True,
    fast_env: bool = True,
    pipeline: bool = False,
    shadow_size: int | None = 1024,
    in_process: bool = True,
    video_processes: int = 0,
) -> EvalResult:
    """Evaluate ``policy`` for ``episodes`` episodes in a fresh :class:`Evaluator`; see :meth:`Evaluator.run`.

    ``num_envs`` defaults to ``2 * workers``, but no more than ``episodes`` (and no fewer than ``workers``). With
    ``warm_up`` (the default here) the policy is called once on zeros while the worker processes start, so a jitted
    policy compiles meanwhile.
    """
    _check_positive("episodes", episodes)
    if num_envs is None and isinstance(workers, int) and workers >= 1:
        num_envs = max(workers, min(episodes, 2 * workers))
    with Evaluator(
        env_name,
        num_envs=num_envs,
        workers=workers,
        render_size=render_size,
        env_kwargs=env_kwargs,
        fast_env=fast_env,
        shadow_size=shadow_size,
        in_process=in_process,
        video_processes=video_processes,
    ) as evaluator:
        return evaluator.run(
            policy,
            episodes=episodes,
            seed=seed,
            batch_size=batch_size,
            key_mode=key_mode,
            max_episode_steps=max_episode_steps,
            video_episodes=video_episodes,
            frame_skip=frame_skip,
            progress=progress,
            warm_up=warm_up,
            pipeline=pipeline,
        )
