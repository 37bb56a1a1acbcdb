"""Building, refreshing and checking the reversal cache on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stages.core import batches, cache_build, flows
from stages.core.agents import bc_flow
from stages.core.agents.common import init_velocity, make_actor

CONFIG = bc_flow.Config(obs_dim=4, action_dim=2, h=3, flow_steps=4, actor_hidden=(16, 16), batch_size=8)


def dataset(episodes: int = 3, length: int = 11) -> batches.DeviceDataset:
    rng = np.random.default_rng(0)
    n = episodes * length
    terminals = np.zeros(n, np.float32)
    terminals[length - 1 :: length] = 1.0
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    return batches.to_device({
        "observations": obs, "actions": np.tanh(rng.normal(size=(n, 2))).astype(np.float32),
        "rewards": np.zeros(n, np.float32), "masks": np.ones(n, np.float32), "terminals": terminals,
        "next_observations": obs,
    })


def actor(seed: int = 0):
    return init_velocity(make_actor(CONFIG), CONFIG, jax.random.PRNGKey(seed))


def test_every_row_is_reversed_once_in_order_and_round_trips():
    data, params = dataset(), actor()
    blocks = list(cache_build.iter_reversed(CONFIG, params, data, 8, "exact", 30, 1e-7))
    rows = np.concatenate([b[0] for b in blocks])
    np.testing.assert_array_equal(rows, np.arange(data.size))  # the padded last block is cut back
    trajectory = np.concatenate([b[1] for b in blocks])
    assert trajectory.shape == (data.size, CONFIG.flow_steps + 1, CONFIG.chunk_dim)
    chunks = batches.chunks_at(data, jnp.arange(data.size), CONFIG.h, 1.0)["actions"]
    np.testing.assert_array_equal(trajectory[:, -1], np.asarray(chunks))  # x_F is the (padded) dataset chunk
    assert np.concatenate([b[2] for b in blocks]).max() < 1e-4


def test_the_device_rebuild_matches_the_streamed_reversal():
    data, params = dataset(), actor()
    streamed = np.concatenate([b[1] for b in cache_build.iter_reversed(CONFIG, params, data, 8, "euler", 1, 1e-6)])
    rebuilt = cache_build.rebuild(CONFIG, params, data, 8, "euler", 1, 1e-6)
    np.testing.assert_allclose(np.asarray(rebuilt), streamed, rtol=0, atol=1e-6)


def test_drift_is_zero_for_the_actor_the_cache_came_from_and_grows_for_another():
    data, params = dataset(), actor()
    table = cache_build.rebuild(CONFIG, params, data, 8, "exact", 30, 1e-7)
    cached = data.replace(reversal=table)
    rows = jnp.arange(data.size)
    same = jax.device_get(cache_build.drift(CONFIG, params, cached, rows, 1e-3))
    assert same["cache_drift_max"] < 1e-4 and same["cache_stale_fraction"] == 0.0
    other = jax.device_get(cache_build.drift(CONFIG, actor(1), cached, rows, 1e-3))
    assert other["cache_drift_mean"] > 1e-2 and other["cache_stale_fraction"] > 0.5
    # the drift measures exactly the sampler's miss from the cached noise
    velocity = lambda s, x, t: make_actor(CONFIG).apply({"params": actor(1)}, s, x, t)
    chunk = batches.chunks_at(data, rows, CONFIG.h, 1.0)
    miss = flows.roundtrip_error(velocity, chunk["observations"], table[:, 0], chunk["actions"], CONFIG.flow_steps)
    np.testing.assert_allclose(other["cache_drift_mean"], float(jnp.mean(miss)), rtol=1e-5)
