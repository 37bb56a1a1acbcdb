"""The reversal cache as the train stage uses it: the dataset's prior, the shards read back, drift and refresh."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stages import layout
from stages.core import cache_build, policy_file, shards
from stages.core.agents.common import copy_tree, init_velocity, make_actor
from stages.core.files import sha256_file

log = logging.getLogger(__name__)
PRIOR_FILE = "policy.msgpack"
REBUILD_HINT = "rebuild it with `dvc repro reverse@{dataset}` (or `dvc pull` the matching one)"


@dataclass(frozen=True)
class Prior:
    """The dataset's BC flow prior: actor params and the sha256 of its export."""

    params: Any
    sha256: str


def actor_template(config) -> Any:
    """Shapes and dtypes of a flow actor's params for ``config`` (no computation)."""
    return jax.eval_shape(lambda key: init_velocity(make_actor(config), config, key), jax.random.PRNGKey(0))


def load_prior(dataset: str, config) -> Prior:
    """Read ``data/priors/<dataset>/policy.msgpack``, checked against the actor shape ``config`` describes."""
    path = layout.prior_dir(dataset) / PRIOR_FILE
    loaded = policy_file.load_policy(path, template=actor_template(config))
    digest = sha256_file(path)
    return Prior(params=jax.tree_util.tree_map(jnp.asarray, loaded.params), sha256=digest)


def load_cache(dataset: str, config, dataset_sha256: str, prior_sha256: str) -> tuple[np.ndarray, dict]:
    """The dataset's reversal cache as (N, F + 1, h*d), checked against the dataset file and prior in use, and a
    summary of its round-trip errors (method, rows, quantiles and a log-spaced histogram) for the report."""
    directory, hint = layout.reversed_dir(dataset), REBUILD_HINT.format(dataset=dataset)
    cache = shards.read_cache(
        directory, inputs={"dataset": dataset_sha256, "prior": prior_sha256}, F=config.flow_steps, h=config.h,
        d=config.action_dim, rebuild_hint=hint,
    )
    if not np.array_equal(cache.rows, np.arange(cache.rows.size)):
        raise shards.ShardCacheError(f"{directory}: rows are not 0..N-1 in order: {hint}")
    summary = roundtrip_summary(cache.roundtrip_error, cache.manifest.method)
    log.info("read the reversal cache %s: %d rows (%s, max round-trip error %.2e)", directory, cache.rows.size,
             cache.manifest.method, summary["max"])
    return cache.x, summary


def roundtrip_summary(errors: np.ndarray, method: str, bins: int = 30) -> dict:
    """Quantiles and a log-spaced histogram of per-row round-trip errors (JSON-ready)."""
    errors = np.asarray(errors, dtype=np.float64)
    floor = 1e-9
    clipped = np.clip(errors, floor, None)
    low, high = clipped.min(), max(clipped.max(), clipped.min() * 10)
    edges = np.logspace(np.log10(low), np.log10(high), bins + 1)
    edges[0], edges[-1] = low, high  # exactly: 10 ** log10(x) can miss x, dropping the smallest or largest row
    counts, _ = np.histogram(clipped, bins=edges)
    return {"method": method, "rows": int(errors.size), "median": float(np.median(errors)),
            "p99": float(np.quantile(errors, 0.99)), "max": float(errors.max()),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def drift_probe(config, data, rows: int, tolerance: float) -> Callable[[Any, Any], dict[str, float]]:
    """A function ``(actor_params, data) -> drift metrics`` on a fixed random subset of ``rows`` cache rows.

    The metrics are those of :func:`stages.core.cache_build.drift` (``cache_drift_median``, ``cache_drift_p90``,
    ``cache_drift_rel``, ``cache_drift_mean``, ``cache_drift_max``, ``cache_stale_fraction``); ``tolerance`` only
    sets the last one. The report plots the median, p90 and relative drift
    (``stages.core.report_content.DRIFT_METRICS``).
    """
    picked = jnp.asarray(np.random.default_rng(0).choice(data.size, size=min(rows, data.size), replace=False))

    def probe(actor_params, current_data) -> dict[str, float]:
        values = cache_build.drift(config, actor_params, current_data, picked, tolerance)
        return {name: float(value) for name, value in jax.device_get(values).items()}

    return probe


def refresh(config, actor_params, data, reverse_params):
    """``data`` with its cache rebuilt on the device from ``actor_params``, the way the cache was built
    (``reverse_params``: the params' ``reverse`` section)."""
    log.info("refreshing the reversal cache from the current actor (%d rows, %s)", data.size, reverse_params.method)
    table = cache_build.rebuild(config, actor_params, data, min(reverse_params.batch_size, data.size),
                                reverse_params.method, reverse_params.iterations, reverse_params.tolerance)
    return data.replace(reversal=table)


def start_from_prior(state, prior: Prior):
    """The RQL state with its actor and EMA actor set to (separate copies of) the prior."""
    return state.replace(actor=copy_tree(prior.params), ema_actor=copy_tree(prior.params))
