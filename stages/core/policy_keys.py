"""Policy calls of an evaluation: the seed of each episode, the PRNG key of each batched call, and the checks of
what the policy returns."""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np

KeyMode = Literal["call", "row"]


def episode_seed(base_seed: int, episode: int) -> int:
    """The environment reset seed of episode ``episode``: a hash of ``(base_seed, episode)`` in [0, 2**32)."""
    if base_seed < 0 or episode < 0:
        raise ValueError(
            f"seed and episode index must be non-negative, got seed={base_seed}, episode={episode}"
        )
    return int(np.random.SeedSequence([int(base_seed), int(episode)]).generate_state(1, dtype=np.uint32)[0])


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


class Keys:
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
