"""stages/reversal_cache.py: the prior and the cache as training reads them, checked against their inputs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from stages import layout, reversal_cache
from stages.core import policy_file, shards
from stages.core.agents import bc_flow, rql
from stages.core.files import sha256_file
from tests.test_cache_build import CONFIG, actor, dataset

DATASET = "cube-single-play-v0"
INPUTS = {"dataset": "d" * 64, "prior": "p" * 64}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A repository root (layout paths are relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_prior():
    path = layout.prior_dir(DATASET) / reversal_cache.PRIOR_FILE
    path.parent.mkdir(parents=True)
    policy_file.save_policy(path, jax.device_get(actor()), {"algorithm": "bc_flow"})
    return path


def write_cache(rows: np.ndarray, config=CONFIG, inputs=INPUTS, overwrite=False):
    width = (config.flow_steps + 1) * config.chunk_dim
    x = np.arange(rows.size * width, dtype=np.float32).reshape(rows.size, config.flow_steps + 1, -1)
    errors = np.linspace(1e-7, 1e-5, rows.size).astype(np.float32)
    shards.write_cache(layout.reversed_dir(DATASET), [(rows, x, errors)], F=config.flow_steps, h=config.h,
                       d=config.action_dim, method="exact", inputs=inputs, shard_rows=7, overwrite=overwrite)
    return x, errors


def test_the_prior_is_read_with_its_sha256_and_checked_against_the_actor_shape(workdir):
    path = write_prior()
    prior = reversal_cache.load_prior(DATASET, CONFIG)
    assert prior.sha256 == sha256_file(path)
    for got, want in zip(jax.tree_util.tree_leaves(prior.params), jax.tree_util.tree_leaves(actor()), strict=True):
        np.testing.assert_array_equal(got, want)
    wider = bc_flow.Config(obs_dim=4, action_dim=2, h=3, flow_steps=4, actor_hidden=(32, 16), batch_size=8)
    with pytest.raises(policy_file.PolicyFileError, match="does not match the template"):
        reversal_cache.load_prior(DATASET, wider)


def test_the_cache_is_read_whole_with_a_summary_of_its_round_trip_errors(workdir):
    x, errors = write_cache(np.arange(20))
    cache, summary = reversal_cache.load_cache(DATASET, CONFIG, INPUTS["dataset"], INPUTS["prior"])
    np.testing.assert_array_equal(cache, x)
    assert (summary["method"], summary["rows"]) == ("exact", 20)
    assert summary["max"] == pytest.approx(float(errors.max()))
    assert sum(summary["histogram"]["counts"]) == 20


def test_a_cache_of_other_inputs_or_other_rows_is_refused_saying_how_to_rebuild(workdir):
    write_cache(np.arange(20))
    with pytest.raises(shards.ShardCacheError, match="prior") as info:
        reversal_cache.load_cache(DATASET, CONFIG, INPUTS["dataset"], "q" * 64)
    assert f"dvc repro reverse@{DATASET}" in str(info.value)
    write_cache(np.arange(1, 21), overwrite=True)  # a cache of another dataset's rows
    with pytest.raises(shards.ShardCacheError, match="rows are not 0..N-1 in order"):
        reversal_cache.load_cache(DATASET, CONFIG, INPUTS["dataset"], INPUTS["prior"])


def test_the_round_trip_summary_floors_exact_zeros_and_bins_every_row():
    errors = np.array([0.0, 1e-8, 1e-6, 1e-6, 3e-4])
    summary = reversal_cache.roundtrip_summary(errors, "euler", bins=5)
    edges = np.asarray(summary["histogram"]["edges"])
    assert edges[0] == pytest.approx(1e-9) and len(edges) == 6 and np.allclose(np.diff(np.log10(edges)),
                                                                              np.log10(edges[1] / edges[0]))
    assert sum(summary["histogram"]["counts"]) == 5 and summary["median"] == 1e-6 and summary["max"] == 3e-4


def test_the_drift_probe_watches_a_fixed_subset_and_refresh_rebuilds_the_cache(workdir):
    data = dataset()
    cached = data.replace(reversal=jax.numpy.zeros((data.size, CONFIG.flow_steps + 1, CONFIG.chunk_dim)))
    probe = reversal_cache.drift_probe(CONFIG, cached, rows=5, tolerance=1e-2)
    first, again = probe(actor(), cached), probe(actor(), cached)
    assert first == again and first["cache_drift_max"] > 0  # a zero cache misses the chunks

    class Reverse:
        method, iterations, tolerance, batch_size = "exact", 30, 1e-7, 8

    refreshed = reversal_cache.refresh(CONFIG, actor(), cached, Reverse)
    assert probe(actor(), refreshed)["cache_drift_max"] < 1e-4  # rebuilt from the same actor: lands on the chunks


def test_a_cached_run_starts_from_separate_copies_of_the_prior():
    config = rql.Config(obs_dim=4, action_dim=2, h=3, flow_steps=4, actor_hidden=(16, 16), critic_hidden=(8,),
                        batch_size=8, reversal="cached")
    state = rql.init(config, jax.random.PRNGKey(1))
    prior = reversal_cache.Prior(params=actor(), sha256="x")
    started = reversal_cache.start_from_prior(state, prior)
    for a, e, p in zip(*(jax.tree_util.tree_leaves(t) for t in (started.actor, started.ema_actor, prior.params)),
                       strict=True):
        np.testing.assert_array_equal(a, p)
        assert a.unsafe_buffer_pointer() != e.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()
