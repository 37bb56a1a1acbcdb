"""Stage ``train``: one (agent, task, seed) run -> exported policy, dvclive metrics, summary.

    python -m stages.train --agent rql --task cube-single-play-singletask-task2-v0 --seed 0

Orbax checkpoints go to ``data/checkpoints/<agent>/<task>/seed<k>/<fingerprint>/`` (not a DVC output, so DVC never
deletes them): rerunning an interrupted stage resumes from the newest one and ends with the same parameters as an
uninterrupted run. The fingerprint covers everything the run depends on, so changed params start afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time

from stages import cli, layout
from stages.params import env_for_task

log = logging.getLogger("stages.train")
DRIFT_TOLERANCE = 1e-2  # a cached row counts as stale when the current actor maps its x_0 this far from the chunk
TRAIN_EVAL_ENVS = 4  # environments stepped together by the evaluations during training
DRIFT_ROWS = 1024  # rows of the cache the drift is measured on (a fixed random subset)


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]




def main(argv: list[str]) -> None:
    args, params = cli.stage_args("stages.train", __doc__, argv, per_run=True)
    platform = cli.select_device(params.train.device)

    import jax
    import numpy as np
    from dvclive import Live

    from stages import reversal_cache
    from stages.agent_setup import make_policy, run_spec
    from stages.core import batches, checkpoints, rollout, training_loop
    from stages.core.ogbench_data import make_task_env
    from stages.task_data import dataset_fingerprint, load_task_data, training_files

    t = params.train
    files = training_files(args.task)
    data = load_task_data(params, args.task)
    spec = run_spec(params, args.agent, args.task, data.obs_dim, data.action_dim)
    config, module = spec.config, spec.module
    streaming = len(files) > 1 and not spec.uses_cache  # cached runs train on the file the cache was built from
    log.info("run %s on %s, seed %d, %s: %s", args.agent, args.task, args.seed, platform, config)
    if streaming:
        log.info("%d dataset files: the next one every %d steps", len(files), t.dataset_swap_every)

    inputs = {"dataset": dataset_fingerprint(args.task) if streaming else data.sha256}
    cache = prior = cache_summary = None
    if spec.uses_cache:
        prior = reversal_cache.load_prior(args.task, config)
        cache, cache_summary = reversal_cache.load_cache(args.task, config, data.sha256, prior.sha256)
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
    )
    identity = {"agent": args.agent, "task": args.task, "seed": args.seed, "config": dataclasses.asdict(config),
                "schedule": dataclasses.asdict(schedule), "inputs": inputs}
    run_key = fingerprint(identity)
    root = layout.checkpoint_root(args.agent, args.task, args.seed)
    for stale in root.glob("*") if root.exists() else []:
        if stale.name != run_key:
            log.info("removing checkpoints of other settings: %s", stale)
            shutil.rmtree(stale)
    out = layout.run_dir(args.agent, args.task, args.seed)
    out.mkdir(parents=True, exist_ok=True)

    update = module.make_update(config, t.updates_per_call)
    started = time.perf_counter()
    with checkpoints.TrainCheckpointer(root / run_key, save_every=t.checkpoint_every,
                                       metadata={"fingerprint": run_key}) as checkpointer:
        state, resumed = checkpointer.resume(state)
        start_step = resumed or 0
        if resumed:
            log.info("resuming from the checkpoint at step %d", resumed)
        task_env = make_task_env(env_for_task(args.task)) if streaming else None

        def swap(step: int, data_now):
            """The dataset file of the ``dataset_swap_every`` period that ``step`` starts."""
            index = (step // t.dataset_swap_every) % len(files)
            loaded = load_task_data(params, args.task, file_index=index, env=task_env)
            return batches.to_device(loaded.arrays)

        if streaming and start_step:
            device_data = swap(start_step, device_data)
        live = Live(str(out / "live"), resume=bool(resumed), dvcyaml=None, save_dvc_exp=False, report=None)
        drift = reversal_cache.drift_probe(config, device_data, DRIFT_ROWS, DRIFT_TOLERANCE) if spec.uses_cache else None
        # A fixed env count: evaluation results depend on it (one policy key per batched call), and the train
        # stages do not declare the evaluate section; the worker count does not change results.
        workers = min(params.evaluate.workers, TRAIN_EVAL_ENVS)
        evaluator = rollout.Evaluator(env_for_task(args.task), num_envs=min(TRAIN_EVAL_ENVS, t.eval_episodes),
                                      workers=min(workers, t.eval_episodes)) if t.eval_every else None

        def on_metrics(step: int, metrics: dict[str, float], current, data_now) -> None:
            live.step = step
            if drift is not None:
                metrics = {**metrics, **drift(current.actor, data_now)}
            for name, value in metrics.items():
                live.log_metric(f"train/{name}", value)
            live.make_summary()

        def on_eval(step: int, current) -> None:
            policy = make_policy(spec.algorithm, config, module.policy_params(current))
            result = evaluator.run(policy, episodes=t.eval_episodes, seed=rollout.EVAL_SEED + args.seed)
            s = result.summary
            log.info("step %d: success %.1f%% over %d episodes", step, 100 * s.success_rate, s.episodes)
            live.step = step
            live.log_metric("eval/success", 100 * s.success_rate)
            live.log_metric("eval/return", s.mean_return)
            live.make_summary()

        def refresh(current, data_now):
            return reversal_cache.refresh(config, current.actor, data_now, params.reverse)

        try:
            state = training_loop.run(
                state, device_data, update, schedule, start_step=start_step, checkpointer=checkpointer,
                on_metrics=on_metrics, on_eval=on_eval if evaluator else None, eval_at_end=False,
                refresh=refresh if spec.refresh_every else None, swap=swap if streaming else None,
                progress=not args.no_progress,
                description=f"{args.agent} {args.task} s{args.seed}",
            )
        finally:
            if evaluator is not None:
                evaluator.close()
            live.end()
    elapsed = time.perf_counter() - started
    trained = t.steps - start_step

    metadata = {"agent": args.agent, "algorithm": spec.algorithm, "task": args.task, "seed": args.seed,
                "steps": t.steps, "config": dataclasses.asdict(config), "inputs": inputs}
    digest = checkpoints.save_policy(out / "policy.msgpack", jax.device_get(module.policy_params(state)), metadata)
    cli.write_json(out / "summary.json", {
        "agent": args.agent, "task": args.task, "seed": args.seed, "steps": t.steps, "platform": platform,
        "reversal": spec.reversal, "refresh_every": spec.refresh_every, "resumed_from": start_step,
        "wall_time_s": round(elapsed, 3), "steps_per_second": round(trained / elapsed, 3) if trained else None,
        "cache": cache_summary, "policy_sha256": digest, "parameters": int(sum(
            np.size(x) for x in jax.tree_util.tree_leaves(module.policy_params(state)))),
    })
    log.info("done: %d steps in %.1f s; policy %s", trained, elapsed, out / "policy.msgpack")


if __name__ == "__main__":
    cli.run(main)
