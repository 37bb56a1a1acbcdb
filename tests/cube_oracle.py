"""A scripted policy that solves cube-single task 2 from the state observation, and the plain way to roll it out:
what the evaluation, fast-env and video tests compare against."""

from __future__ import annotations

import jax
import numpy as np

from stages.core.policy_keys import episode_seed

TASK = "cube-single-play-singletask-task2-v0"
ENV_ID = "cube-single-singletask-task2-v0"
CENTER = np.array([0.425, 0.0, 0.0])
TARGET = np.array([0.50, 0.0, 0.02])  # task2's goal cube position


# OGBench's Markov cube oracle, phases 1-6, reading effector/gripper/cube state from the observation instead of the
# privileged info dict.


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
