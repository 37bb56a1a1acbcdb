"""Stage ``train``: one (agent, dataset, task number, seed) run -> exported policy, dvclive metrics, summary.

    python -m stages.train --agent rql --dataset cube-single-play-v0 --task 2 --seed 0

It trains on task 2 of the dataset (OGBench's ``cube-single-play-singletask-task2-v0``); cached runs read the
dataset's prior and reversal cache, which all of its tasks share. Orbax checkpoints go to
``data/checkpoints/<agent>/<dataset>/task<k>/seed<s>/<fingerprint>/`` (not a DVC output, so DVC never
deletes them): rerunning an interrupted stage resumes from the newest intact one and ends with the same parameters
and the same learning curves as an uninterrupted run (the metric history is saved with each checkpoint). The
fingerprint covers everything the run depends on, so changed params start afresh. ``RQL_CHECKPOINTS`` (an absolute
path every node of a cluster reaches, or a ``gs://`` URL handed to Orbax as it is) replaces ``data/checkpoints``, so
a run retried on another node resumes too; there, other fingerprints are left alone (they may be other studies' runs
in progress).

Outputs: the stage first removes its previous outputs (``policy.msgpack``, ``summary.json``, ``live/``), so a failed
or killed run never leaves an old file beside a new one. ``live/`` (dvclive: ``metrics.json``,
``plots/metrics/**/*.tsv``) is written once at the end, from the history, into a temporary folder renamed into
place; then ``policy.msgpack`` and last ``summary.json``, each atomically. The pieces: stages.training.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from stages import cli, layout

log = logging.getLogger("stages.train")


def main(argv: list[str]) -> None:
    args, params = cli.stage_args("stages.train", __doc__, argv, per_run=True)
    platform = cli.select_device(params.train.device)

    import jax
    import numpy as np

    from stages import reversal_cache, training
    from stages.agent_setup import run_spec
    from stages.core import batches, checkpoints, policy_file, training_loop
    from stages.task_data import dataset_fingerprint, load_task_data, training_files

    t, task, dataset = params.train, args.task_name, args.dataset
    out = layout.run_dir(args.agent, dataset, args.task, args.seed)
    training.remove_outputs(out)  # before anything can fail: no old summary beside a new policy, no stale curves
    files = training_files(dataset)
    data = load_task_data(params, task)
    spec = run_spec(params, args.agent, dataset, data.obs_dim, data.action_dim)
    config, module = spec.config, spec.module
    streaming = len(files) > 1 and not spec.uses_cache  # cached runs train on the file the cache was built from
    log.info("run %s on %s, seed %d, %s: %s", args.agent, task, args.seed, platform, config)
    if streaming:
        log.info("%d dataset files: the next one every %d steps", len(files), t.dataset_swap_every)

    inputs = {"dataset": dataset_fingerprint(dataset) if streaming else data.sha256}
    cache = prior = cache_summary = None
    if spec.uses_cache:
        prior = reversal_cache.load_prior(dataset, config)
        cache, cache_summary = reversal_cache.load_cache(dataset, config, data.sha256, prior.sha256)
        inputs["prior"] = prior.sha256
    device_data = batches.to_device(data.arrays, reversal=cache)
    del cache

    state = module.init(config, jax.random.PRNGKey(args.seed))
    if spec.starts_from_prior:
        state = reversal_cache.start_from_prior(state, prior)
    schedule = training_loop.Schedule(
        total_steps=t.steps, updates_per_call=t.updates_per_call, log_every=t.log_every,
        checkpoint_every=t.checkpoint_every, eval_every=t.eval_every, refresh_every=spec.refresh_every,
        swap_every=t.dataset_swap_every if streaming else 0,
    )  # fmt: skip
    identity = {"agent": args.agent, "task": task, "seed": args.seed, "config": dataclasses.asdict(config),
                "schedule": dataclasses.asdict(schedule), "inputs": inputs,
                "checkpoint_format": training.CHECKPOINT_FORMAT}  # fmt: skip
    directory = training.checkpoint_dir(args.agent, dataset, args.task, args.seed, identity)
    out.mkdir(parents=True, exist_ok=True)

    update = module.make_update(config, t.updates_per_call)
    started = time.perf_counter()
    with checkpoints.TrainCheckpointer(directory, save_every=t.checkpoint_every,
                                       metadata={"fingerprint": directory.name}) as checkpointer:  # fmt: skip
        state, start_step, history = training.resume(checkpointer, state)
        hooks = training.Hooks(params, task, args.seed, spec, files, device_data, history)
        try:
            if streaming and start_step:
                device_data = hooks.swap(start_step, device_data)
            state = training_loop.run(
                state, device_data, update, schedule, start_step=start_step, checkpointer=checkpointer,
                eval_at_end=False, progress=not args.no_progress, description=f"{args.agent} {task} s{args.seed}",
                **hooks.loop_hooks(),
            )  # fmt: skip
        except training_loop.NonFiniteLossError as exc:
            cache_note = f" with the reversal cache {layout.reversed_dir(dataset)}" if spec.uses_cache else ""
            raise training_loop.NonFiniteLossError(
                f"run {args.agent}/{task}/seed{args.seed} (outputs {out}, trained on "
                f"{hooks.trained_on(exc, data.path)}{cache_note}): {exc}",
                metric=exc.metric, first_step=exc.first_step, last_step=exc.last_step,
            ) from exc  # fmt: skip
        finally:
            hooks.close()
    elapsed = time.perf_counter() - started
    trained = t.steps - start_step

    training.write_live(out / "live", history.rows)
    metadata = {"agent": args.agent, "algorithm": spec.algorithm, "task": task, "seed": args.seed,
                "steps": t.steps, "config": dataclasses.asdict(config), "inputs": inputs}  # fmt: skip
    policy = jax.device_get(module.policy_params(state))
    digest = policy_file.save_policy(out / "policy.msgpack", policy, metadata)
    cli.write_json(out / "summary.json", {
        "agent": args.agent, "task": task, "seed": args.seed, "steps": t.steps, "platform": platform,
        "reversal": spec.reversal, "refresh_every": spec.refresh_every, "resumed_from": start_step,
        "wall_time_s": round(elapsed, 3), "steps_per_second": round(trained / elapsed, 3) if trained else None,
        "cache": cache_summary, "policy_sha256": digest,
        "parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(policy))),
    })  # fmt: skip
    log.info("done: %d steps in %.1f s; policy %s", trained, elapsed, out / "policy.msgpack")


if __name__ == "__main__":
    cli.run(main)
