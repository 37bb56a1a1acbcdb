"""Stage ``prior``: the dataset's BC flow policy (flow matching alone), exported byte-stably.

    python -m stages.prior --dataset cube-single-play-v0

It is the fixed flow the reversal cache is computed through, and the actor's starting point in cached training.
BC reads no reward, so one prior serves every task of the dataset (its settings are the dataset's:
stages.params.resolve_agent). Output: ``data/priors/<dataset>/policy.msgpack`` (the EMA actor) and ``prior.json``
(final losses); both byte-stable.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from stages import cli, layout

log = logging.getLogger("stages.prior")
PRIOR_SEED = 0


def main(argv: list[str]) -> None:
    args, params = cli.stage_args("stages.prior", __doc__, argv, per_run=False)
    platform = cli.select_device(params.train.device)

    import jax

    from stages.agent_setup import prior_config
    from stages.core import batches, policy_file, training_loop
    from stages.core.agents import bc_flow
    from stages.task_data import load_dataset_data

    data = load_dataset_data(args.dataset)
    config = prior_config(params, args.dataset, data.obs_dim, data.action_dim)
    steps, per_call = params.prior.steps, params.train.updates_per_call
    log.info("BC prior for %s on %s: %d steps, %s", args.dataset, platform, steps, config)
    schedule = training_loop.Schedule(total_steps=steps, updates_per_call=per_call, log_every=steps,
                                      checkpoint_every=steps)
    losses: list[dict] = []
    started = time.perf_counter()
    state = training_loop.run(
        bc_flow.init(config, jax.random.PRNGKey(PRIOR_SEED)), batches.to_device(data.arrays),
        bc_flow.make_update(config, per_call), schedule,
        on_metrics=lambda step, metrics, *_: losses.append({"step": step, **metrics}),
        progress=not args.no_progress, description=f"prior {args.dataset}",
    )
    elapsed = time.perf_counter() - started
    out = layout.prior_dir(args.dataset)
    metadata = {"agent": "bc_flow", "algorithm": "bc_flow", "dataset": args.dataset, "seed": PRIOR_SEED,
                "steps": steps, "config": dataclasses.asdict(config), "inputs": {"dataset": data.sha256}}
    digest = policy_file.save_policy(out / "policy.msgpack", jax.device_get(bc_flow.policy_params(state)), metadata)
    final = {k: v for k, v in losses[-1].items() if k != "steps_per_second"}  # byte-stable: no timings
    cli.write_json(out / "prior.json", {"dataset": args.dataset, "steps": steps, "final_metrics": final,
                                        "policy_sha256": digest, "dataset_sha256": data.sha256})
    log.info("prior for %s: %d steps in %.1f s, final bc_loss %.4f -> %s", args.dataset, steps, elapsed,
             losses[-1].get("bc_loss", float("nan")), out / "policy.msgpack")


if __name__ == "__main__":
    cli.run(main)
