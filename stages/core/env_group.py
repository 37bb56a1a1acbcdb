"""A group of environments that each run one episode at a time, stepped a whole action chunk per command; used in
the evaluating process or inside a worker process (stages.core.env_workers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stages.core.ogbench_names import registered_env_ids


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


class EnvGroup:
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
