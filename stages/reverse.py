"""Stage ``reverse``: every chunk of a dataset reversed through its prior -> Parquet shards + manifest.

    python -m stages.reverse --dataset cube-single-play-v0

One cache per dataset (``data/reversed/<dataset>/``), shared by the cached runs of all of its tasks: the reversal
reads observations and actions only, no reward.

Row i holds the virtual trajectory x_0 .. x_F of the chunk starting at dataset row i (``reverse.method``: ``exact``
fixed-point inverse of the sampler's Euler step, or the reference's ``euler`` backward step) and its round-trip
error. Same dataset + prior + params give byte-identical shards, so teammates share them through the DVC remote.
"""

from __future__ import annotations

import logging
import time

from stages import cli, layout

log = logging.getLogger("stages.reverse")


def main(argv: list[str]) -> None:
    args, params = cli.stage_args("stages.reverse", __doc__, argv, per_run=False)
    platform = cli.select_device(params.train.device)

    from stages import reversal_cache
    from stages.agent_setup import prior_config
    from stages.core import batches, cache_build, shards
    from stages.task_data import load_dataset_data

    data = load_dataset_data(args.dataset)
    config = prior_config(params, args.dataset, data.obs_dim, data.action_dim)
    prior = reversal_cache.load_prior(args.dataset, config)
    r = params.reverse
    device_data = batches.to_device(data.arrays)
    log.info("reversing %d chunks of %s through its prior (%s, F=%d, h=%d) on %s", data.size, args.dataset, r.method,
             config.flow_steps, config.h, platform)
    residual_max = 0.0

    def reversed_rows():
        nonlocal residual_max
        for rows, trajectory, error, residual in cache_build.iter_reversed(
            config, prior.params, device_data, r.batch_size, r.method, r.iterations, r.tolerance
        ):
            residual_max = max(residual_max, float(residual.max()))
            yield rows, trajectory, error

    started = time.perf_counter()
    manifest = shards.write_cache(
        layout.reversed_dir(args.dataset), reversed_rows(), F=config.flow_steps, h=config.h, d=config.action_dim,
        method=r.method, inputs={"dataset": data.sha256, "prior": prior.sha256}, shard_rows=r.shard_rows,
        extra={"iterations": r.iterations, "tolerance": r.tolerance}, progress=not args.no_progress,
        total_rows=data.size, overwrite=True,
    )
    elapsed = time.perf_counter() - started
    log.info("wrote %d rows in %d shards in %.1f s (%.0f chunks/s); round-trip error %s; max fixed-point residual %.2e",
             manifest.total_rows, len(manifest.shards), elapsed, manifest.total_rows / max(elapsed, 1e-9),
             manifest.roundtrip_error, residual_max)


if __name__ == "__main__":
    cli.run(main)
