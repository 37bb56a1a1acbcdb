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


def test_drift_quantiles_and_relative_drift_match_their_definitions_and_keep_moving_past_the_tolerance():
    data, params = dataset(), actor()
    cached = data.replace(reversal=cache_build.rebuild(CONFIG, params, data, 8, "exact", 30, 1e-7))
    rows = jnp.arange(data.size)
    chunk = np.asarray(batches.chunks_at(cached, rows, CONFIG.h, 1.0)["actions"])
    observations = batches.chunks_at(cached, rows, CONFIG.h, 1.0)["observations"]
    fresh = jax.device_get(cache_build.drift(CONFIG, params, cached, rows, 1e-3))
    assert fresh["cache_drift_rel"] < 1e-4 and fresh["cache_drift_p90"] < 1e-4
    previous = None
    for scale in (0.5, 1.0, 2.0):  # actors ever farther from the one the cache came from
        moved = jax.tree_util.tree_map(lambda p, q, c=scale: p + c * (q - p), params, actor(1))
        velocity = lambda s, x, t, p=moved: make_actor(CONFIG).apply({"params": p}, s, x, t)
        miss = np.asarray(flows.euler_sample(velocity, observations, cached.reversal[rows, 0], CONFIG.flow_steps,
                                             clip=False)) - chunk
        per_row = np.abs(miss).max(axis=-1)
        got = jax.device_get(cache_build.drift(CONFIG, moved, cached, rows, 1e-3))
        np.testing.assert_allclose(got["cache_drift_median"], np.median(per_row), rtol=1e-4)
        np.testing.assert_allclose(got["cache_drift_p90"], np.quantile(per_row, 0.9), rtol=1e-4)
        np.testing.assert_allclose(got["cache_drift_rel"], np.sqrt((miss**2).mean() / (chunk**2).mean()), rtol=1e-4)
        assert got["cache_stale_fraction"] == 1.0  # the old metric is saturated at every one of these actors ...
        if previous is not None:  # ... while the new ones still order them
            assert got["cache_drift_median"] > previous["cache_drift_median"]
            assert got["cache_drift_rel"] > previous["cache_drift_rel"]
        previous = got


def test_the_report_plots_metrics_the_drift_probe_logs():
    from stages.core import report_content

    data, params = dataset(), actor()
    cached = data.replace(reversal=cache_build.rebuild(CONFIG, params, data, 8, "euler", 1, 1e-6))
    logged = jax.device_get(cache_build.drift(CONFIG, params, cached, jnp.arange(4), 1e-2))
    assert set(report_content.DRIFT_METRICS) <= set(logged)
