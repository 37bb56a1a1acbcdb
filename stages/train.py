"""Stage ``train``: one (agent, task, seed) run -> exported policy, dvclive metrics, summary.

    python -m stages.train --agent rql --task cube-single-play-singletask-task2-v0 --seed 0

Orbax checkpoints go to ``data/checkpoints/<agent>/<task>/seed<k>/<fingerprint>/`` (not a DVC output, so DVC never
deletes them): rerunning an interrupted stage resumes from the newest intact one and ends with the same parameters
and the same learning curves as an uninterrupted run (the metric history is saved with each checkpoint). The
fingerprint covers everything the run depends on, so changed params start afresh. ``RQL_CHECKPOINTS`` (an absolute
path every node of a cluster reaches) replaces ``data/checkpoints``, so a run retried on another node resumes too;
there, other fingerprints are left alone (they may be other studies' runs in progress).

Outputs: the stage first removes its previous outputs (``policy.msgpack``, ``summary.json``, ``live/``), so a failed
or killed run never leaves an old file beside a new one. ``live/`` (dvclive: ``metrics.json``,
``plots/metrics/**/*.tsv``) is written once at the end, from the history, into a temporary folder renamed into
place; then ``policy.msgpack`` and last ``summary.json``, each atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from stages import cli, layout
from stages.params import env_for_task

log = logging.getLogger("stages.train")
DRIFT_TOLERANCE = 1e-2  # a cached row counts as stale when the current actor maps its x_0 this far from the chunk
TRAIN_EVAL_ENVS = 4  # environments stepped together by the evaluations during training
DRIFT_ROWS = 1024  # rows of the cache the drift is measured on (a fixed random subset)
# Part of the fingerprint: checkpoints of another layout (before 2: no metric history) are not resumed.
CHECKPOINT_FORMAT = 2
OUTPUTS = ("policy.msgpack", "summary.json", "live")  # the declared outputs of a run directory (dvc.yaml)
LIVE_TMP_PREFIX = ".live."


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remove_outputs(out: Path) -> None:
    """Delete the run's previous outputs and any temporary folder a killed run left (DVC does the former itself)."""
    for path in [*(out / name for name in OUTPUTS), *out.glob(f"{LIVE_TMP_PREFIX}*.tmp")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_live(target: Path, rows: list) -> None:
    """Write the dvclive folder of ``rows`` (``[step, {name: value}]``, as logged) atomically: dvclive writes it
    into a temporary folder beside ``target``, which is then renamed into place."""
    from dvclive import Live

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=LIVE_TMP_PREFIX, suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would not be what a plain mkdir gives
        live = Live(str(tmp), resume=False, dvcyaml=None, save_dvc_exp=False, report=None)
        for step, metrics in rows:
            live.step = step
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.make_summary()
        live.end()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def main(argv: list[str]) -> None:
    args, params = cli.stage_args("stages.train", __doc__, argv, per_run=True)
    platform = cli.select_device(params.train.device)

    import jax
    import numpy as np

    from stages import reversal_cache
    from stages.agent_setup import make_policy, run_spec
    from stages.core import batches, checkpoints, rollout, training_loop
    from stages.core.ogbench_data import make_task_env
    from stages.task_data import dataset_fingerprint, load_task_data, training_files

    t = params.train
    out = layout.run_dir(args.agent, args.task, args.seed)
    remove_outputs(out)  # before anything can fail: no old summary beside a new policy, no stale curves
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
                "schedule": dataclasses.asdict(schedule), "inputs": inputs, "checkpoint_format": CHECKPOINT_FORMAT}
    run_key = fingerprint(identity)
    root = layout.checkpoint_root(args.agent, args.task, args.seed)
    # A shared location ($RQL_CHECKPOINTS) may hold the runs of other studies in progress: only data/ is pruned.
    for stale in root.glob("*") if root.exists() and not layout.shared_checkpoints() else []:
        if stale.name != run_key:
            log.info("removing checkpoints of other settings: %s", stale)
            shutil.rmtree(stale)
    out.mkdir(parents=True, exist_ok=True)
    cache_note = f" with the reversal cache {layout.reversed_dir(args.task)}" if spec.uses_cache else ""

    update = module.make_update(config, t.updates_per_call)
    started = time.perf_counter()
    with checkpoints.TrainCheckpointer(root / run_key, save_every=t.checkpoint_every,
                                       metadata={"fingerprint": run_key}) as checkpointer:
        resumed = checkpointer.resume(state)
        state, start_step = resumed.state, resumed.step or 0
        history = training_loop.MetricHistory()
        if resumed.step:
            log.info("resuming from the checkpoint at step %d", resumed.step)
            try:
                history = training_loop.MetricHistory(resumed.extras["history"]).upto(resumed.step)
            except (KeyError, TypeError, ValueError) as exc:
                raise checkpoints.CheckpointError(
                    f"checkpoint step {resumed.step} in {root / run_key} has no valid metric history ({exc}); "
                    f"delete {root / run_key} to start this run over") from exc
        task_env = make_task_env(env_for_task(args.task)) if streaming else None

        def swap(step: int, data_now):
            """The dataset file of the ``dataset_swap_every`` period that ``step`` starts."""
            index = (step // t.dataset_swap_every) % len(files)
            loaded = load_task_data(params, args.task, file_index=index, env=task_env)
            return batches.to_device(loaded.arrays)

        if streaming and start_step:
            device_data = swap(start_step, device_data)
        drift = reversal_cache.drift_probe(config, device_data, DRIFT_ROWS, DRIFT_TOLERANCE) if spec.uses_cache else None
        # A fixed env count: evaluation results depend on it (one policy key per batched call), and the train
        # stages do not declare the evaluate section; the worker count does not change results.
        workers = min(params.evaluate.workers, TRAIN_EVAL_ENVS)
        evaluator = rollout.Evaluator(env_for_task(args.task), num_envs=min(TRAIN_EVAL_ENVS, t.eval_episodes),
                                      workers=min(workers, t.eval_episodes)) if t.eval_every else None

        def on_metrics(step: int, metrics: dict[str, float], current, data_now) -> None:
            if drift is not None:
                metrics = {**metrics, **drift(current.actor, data_now)}
            history.record(step, {f"train/{name}": value for name, value in metrics.items()})

        def on_eval(step: int, current) -> None:
            policy = make_policy(spec.algorithm, config, module.policy_params(current))
            result = evaluator.run(policy, episodes=t.eval_episodes, seed=rollout.EVAL_SEED + args.seed)
            s = result.summary
            log.info("step %d: success %.1f%% over %d episodes", step, 100 * s.success_rate, s.episodes)
            history.record(step, {"eval/success": 100 * s.success_rate, "eval/return": s.mean_return})

        def refresh(current, data_now):
            return reversal_cache.refresh(config, current.actor, data_now, params.reverse)

        try:
            state = training_loop.run(
                state, device_data, update, schedule, start_step=start_step, checkpointer=checkpointer,
                on_metrics=on_metrics, on_eval=on_eval if evaluator else None, eval_at_end=False,
                refresh=refresh if spec.refresh_every else None, swap=swap if streaming else None,
                checkpoint_extras=lambda: {"history": history.rows}, progress=not args.no_progress,
                description=f"{args.agent} {args.task} s{args.seed}",
            )
        except training_loop.NonFiniteLossError as exc:
            # Logging windows end at swap boundaries, so the failing steps trained on one file.
            index = ((exc.first_step - 1) // t.dataset_swap_every) % len(files) if streaming else 0
            trained_on = f"{files[index]} (file {index + 1} of {len(files)})" if streaming else str(data.path)
            raise training_loop.NonFiniteLossError(
                f"run {args.agent}/{args.task}/seed{args.seed} (outputs {out}, trained on {trained_on}{cache_note}): "
                f"{exc}",
                metric=exc.metric, first_step=exc.first_step, last_step=exc.last_step,
            ) from exc
        finally:
            if evaluator is not None:
                evaluator.close()
    elapsed = time.perf_counter() - started
    trained = t.steps - start_step

    write_live(out / "live", history.rows)

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
