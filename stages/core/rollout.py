"""Batched evaluation of an action-chunking policy in an OGBench single-task environment.

Pure library: knows nothing of the project's files or params. :class:`Evaluator` makes the environments (and worker
processes) once and runs evaluations in them, so evaluation during training pays the start-up (worker interpreters,
the first env of each process) only once; use it as a context manager.

This module is the scheduler (which episode runs where, when the policy is called). The pieces it uses:
stages.core.env_group (envs stepped a chunk per command), stages.core.env_workers (the worker processes),
stages.core.policy_keys (episode seeds, PRNG keys, output checks), stages.core.eval_results (what it returns),
stages.core.stats (the Wilson interval).

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

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from stages.core.env_workers import Backend
from stages.core.eval_results import EpisodeResult, EvalResult, summarize
from stages.core.ogbench_names import resolve_env_id
from stages.core.policy_keys import KeyMode, Keys, check_actions, episode_seed

Policy = Callable[[np.ndarray, Any], Any]
"""``policy(observations (n, *obs_shape), key) -> actions (n, h, d)``; see :meth:`Evaluator.run` for ``key``."""

TIMELINE_ENV = "RQL_EVAL_TIMELINE"  # a file: Evaluator.run appends "<event>\t<unix time>" lines (benchmarks)
EVAL_SEED = 1_000_000  # base seed of evaluation episodes (run seed added), apart from training seeds; the evaluate
# stage and the evaluations during training use the same episodes


def _mark(event: str) -> None:
    """Append ``event`` and the wall-clock time to the file named by $RQL_EVAL_TIMELINE, if set (for benchmarks that
    time a whole process: start-up up to the first finished episode, the rollout, the video)."""
    path = os.environ.get(TIMELINE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{event}\t{time.time():.6f}\n")


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
        self._backend = Backend(
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

        keys = Keys(int(seed), key_mode, batch_size)
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
