"""Building, refreshing and checking the reversal cache on the device.

A cache row i is the whole virtual trajectory of the chunk that starts at dataset row i, reversed through a flow
actor on the sampler's grid: x_0 ... x_F (x_F = the chunk, padded at the episode end as in training). These
functions take a flow config (anything with ``obs_dim``, ``action_dim``, ``h``, ``flow_steps``, ``actor_hidden``,
``actor_layer_norm``), the actor's params and a :class:`~stages.core.batches.DeviceDataset`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from stages.core import flows
from stages.core.agents.common import velocity_fn
from stages.core.batches import DeviceDataset, chunks_at


@partial(jax.jit, static_argnames=("config", "method", "iterations", "tolerance"))
def reverse_rows(config, actor_params, data: DeviceDataset, rows: jax.Array, method: str, iterations: int,
                 tolerance: float):
    """Reverse the chunks starting at ``rows`` (B,): (trajectory (B, F + 1, h*d), round-trip error (B,), residual (B,)).

    The round-trip error is max |sampler(x_0) - chunk| per row (sampler without its final clip): how well the
    cached x_0 still maps onto the dataset chunk through this actor.
    """
    velocity = velocity_fn(config, actor_params)
    batch = chunks_at(data, rows, config.h, 1.0)
    s, chunk = batch["observations"], batch["actions"]
    trajectory, info = flows.reverse_trajectory(
        velocity, s, chunk, config.flow_steps, method, iterations=iterations, tolerance=tolerance
    )
    error = flows.roundtrip_error(velocity, s, trajectory[:, 0], chunk, config.flow_steps)
    return trajectory, error, info["residual"]


def _blocks(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Row blocks of exactly ``batch_size`` (the last one padded by repeating its final row) covering 0..n-1."""
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n), dtype=np.int32)
        yield np.pad(rows, (0, batch_size - rows.size), mode="edge")


def iter_reversed(config, actor_params, data: DeviceDataset, batch_size: int, method: str, iterations: int,
                  tolerance: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every row of ``data`` reversed, in row order, as host arrays ``(rows, trajectory, error, residual)``.

    Blocks have a fixed size, so one compiled program serves the whole dataset; the next block is dispatched
    before the previous one is copied to the host.
    """
    n = data.size
    batch_size = min(batch_size, n)
    pending = None
    for block in _blocks(n, batch_size):
        result = reverse_rows(config, actor_params, data, jnp.asarray(block), method, iterations, tolerance)
        if pending is not None:
            yield _to_host(*pending)
        pending = (block, result)
    if pending is not None:
        yield _to_host(*pending)


def _to_host(block: np.ndarray, result) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    trajectory, error, residual = jax.device_get(result)
    keep = np.concatenate([[True], block[1:] != block[:-1]])  # drop the edge padding
    return block[keep].astype(np.int64), trajectory[keep], error[keep], residual[keep]


@partial(jax.jit, static_argnames=("config", "batch_size", "method", "iterations", "tolerance"))
def rebuild(config, actor_params, data: DeviceDataset, batch_size: int, method: str, iterations: int,
            tolerance: float) -> jax.Array:
    """The whole cache (N, F + 1, h*d) recomputed on the device from ``actor_params`` (no host round trip)."""
    n = data.size
    blocks = -(-n // batch_size)
    rows = jnp.minimum(jnp.arange(blocks * batch_size, dtype=jnp.int32), n - 1).reshape(blocks, batch_size)
    velocity = velocity_fn(config, actor_params)

    def one(block):
        batch = chunks_at(data, block, config.h, 1.0)
        trajectory, _ = flows.reverse_trajectory(
            velocity, batch["observations"], batch["actions"], config.flow_steps, method,
            iterations=iterations, tolerance=tolerance,
        )
        return trajectory

    return jax.lax.map(one, rows).reshape(blocks * batch_size, config.flow_steps + 1, -1)[:n]


@partial(jax.jit, static_argnames=("config",))
def drift(config, actor_params, data: DeviceDataset, rows: jax.Array, tolerance: float) -> dict[str, jax.Array]:
    """Staleness of the cache for the current actor, on ``rows``: the sampler run from each cached x_0 with the
    current actor (final clip off, as in the round-trip error), compared with the dataset chunk.

    Per row, the drift is the max-abs distance max_j |sampler(x_0)_j - a_j| (the round-trip error's unit). Returns

    - ``cache_drift_median``, ``cache_drift_p90``: quantiles of the per-row drift. Unlike a share of rows beyond a
      fixed tolerance, which saturates at 1 as soon as most rows cross it, quantiles keep moving as the actor drifts
      away from the cache and fall back after a refresh;
    - ``cache_drift_rel``: the drift relative to the chunks' own scale, sqrt(mean |sampler(x_0) - a|^2) /
      sqrt(mean |a|^2) over the rows and coordinates (a normalised RMS error). 0: the cached x_0 still lands on the
      chunk; 1: the miss is as large as the chunks themselves (no better than answering 0). Scale-free, so it
      compares across tasks and action spaces;
    - ``cache_drift_mean``, ``cache_drift_max``: mean and max of the per-row drift;
    - ``cache_stale_fraction``: the share of rows farther than ``tolerance`` (kept for continuity; it saturates).
    """
    velocity = velocity_fn(config, actor_params)
    batch = chunks_at(data, rows, config.h, 1.0)
    x0 = data.reversal[rows, 0]
    chunk = batch["actions"]
    miss = flows.euler_sample(velocity, batch["observations"], x0, config.flow_steps, clip=False) - chunk
    error = jnp.max(jnp.abs(miss), axis=-1)
    tiny = jnp.finfo(jnp.float32).tiny
    return {
        "cache_drift_mean": jnp.mean(error),
        "cache_drift_median": jnp.median(error),
        "cache_drift_p90": jnp.quantile(error, 0.9),
        "cache_drift_max": jnp.max(error),
        "cache_drift_rel": jnp.sqrt(jnp.mean(jnp.square(miss)) / jnp.maximum(jnp.mean(jnp.square(chunk)), tiny)),
        "cache_stale_fraction": jnp.mean((error > tolerance).astype(jnp.float32)),
    }
