"""The pieces of one training run that the train stage puts together: its outputs, its checkpoint identity and
resume, and the hooks the training loop calls (dataset swaps, metrics with the cache's drift, evaluations, cache
refreshes). Imported by the train stage once the device is chosen."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from stages import layout, reversal_cache
from stages.core import batches, checkpoints, rollout, training_loop
from stages.core.ogbench_data import make_task_env
from stages.core.ogbench_names import env_for_task
from stages.task_data import load_task_data

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


def checkpoint_dir(agent: str, dataset: str, task: int, seed: int, identity: dict) -> Any:
    """The run's checkpoint folder, named by the fingerprint of ``identity``; under data/checkpoints the folders of
    other settings are removed (a shared location, $RQL_CHECKPOINTS, may hold other studies' runs in progress).
    A ``pathlib.Path``, or an ``etils.epath.Path`` of the URL under a ``gs://`` $RQL_CHECKPOINTS."""
    run_key, root = fingerprint(identity), layout.checkpoint_root(agent, dataset, task, seed)
    for stale in root.glob("*") if not layout.shared_checkpoints() and root.exists() else []:  # (no URL asked)
        if stale.name != run_key:
            log.info("removing checkpoints of other settings: %s", stale)
            shutil.rmtree(stale)
    return root / run_key


def resume(checkpointer: checkpoints.TrainCheckpointer, state: Any) -> tuple[Any, int, training_loop.MetricHistory]:
    """(state, step, metric history) of the newest intact checkpoint, or of the start."""
    resumed = checkpointer.resume(state)
    if not resumed.step:
        return resumed.state, 0, training_loop.MetricHistory()
    log.info("resuming from the checkpoint at step %d", resumed.step)
    try:
        history = training_loop.MetricHistory(resumed.extras["history"]).upto(resumed.step)
    except (KeyError, TypeError, ValueError) as exc:
        raise checkpoints.CheckpointError(
            f"checkpoint step {resumed.step} in {checkpointer.directory} has no valid metric history ({exc}); "
            f"delete {checkpointer.directory} to start this run over") from exc  # fmt: skip
    return resumed.state, resumed.step, history


class Hooks:
    """What the training loop calls back during one run; ``loop_hooks()`` gives the ones this run uses."""

    def __init__(self, params, task: str, seed: int, spec, files: list[Path], data, history):
        self.params, self.task, self.seed, self.spec, self.files, self.history = params, task, seed, spec, files, history
        self.streaming = len(files) > 1 and not spec.uses_cache  # cached runs train on the cache's file
        self.task_env = make_task_env(env_for_task(task)) if self.streaming else None
        self.drift = reversal_cache.drift_probe(spec.config, data, DRIFT_ROWS, DRIFT_TOLERANCE) \
            if spec.uses_cache else None  # fmt: skip
        t = params.train
        # A fixed env count: evaluation results depend on it (one policy key per batched call), and the train
        # stages do not declare the evaluate section; the worker count does not change results.
        workers = min(params.evaluate.workers, TRAIN_EVAL_ENVS)
        self.evaluator = rollout.Evaluator(env_for_task(task), num_envs=min(TRAIN_EVAL_ENVS, t.eval_episodes),
                                           workers=min(workers, t.eval_episodes)) if t.eval_every else None  # fmt: skip

    def file_of(self, step: int) -> int:
        """The dataset file the ``dataset_swap_every`` period that ``step`` starts trains on."""
        return (step // self.params.train.dataset_swap_every) % len(self.files)

    def swap(self, step: int, data_now):
        loaded = load_task_data(self.params, self.task, file_index=self.file_of(step), env=self.task_env)
        return batches.to_device(loaded.arrays)

    def on_metrics(self, step: int, metrics: dict[str, float], current, data_now) -> None:
        if self.drift is not None:
            metrics = {**metrics, **self.drift(current.actor, data_now)}
        self.history.record(step, {f"train/{name}": value for name, value in metrics.items()})

    def on_eval(self, step: int, current) -> None:
        from stages.agent_setup import make_policy

        policy = make_policy(self.spec.algorithm, self.spec.config, self.spec.module.policy_params(current))
        result = self.evaluator.run(policy, episodes=self.params.train.eval_episodes, seed=rollout.EVAL_SEED + self.seed)
        s = result.summary
        log.info("step %d: success %.1f%% over %d episodes", step, 100 * s.success_rate, s.episodes)
        self.history.record(step, {"eval/success": 100 * s.success_rate, "eval/return": s.mean_return})

    def refresh(self, current, data_now):
        return reversal_cache.refresh(self.spec.config, current.actor, data_now, self.params.reverse)

    def loop_hooks(self) -> dict:
        """The keyword arguments of ``training_loop.run`` for these hooks."""
        return {"on_metrics": self.on_metrics, "on_eval": self.on_eval if self.evaluator else None,
                "refresh": self.refresh if self.spec.refresh_every else None,
                "swap": self.swap if self.streaming else None,
                "checkpoint_extras": lambda: {"history": self.history.rows}}  # fmt: skip

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()

    def trained_on(self, exc: training_loop.NonFiniteLossError, data_path: Path) -> str:
        """The file the failing steps trained on (logging windows end at swap boundaries: one file)."""
        if not self.streaming:
            return str(data_path)
        index = self.file_of(exc.first_step - 1)
        return f"{self.files[index]} (file {index + 1} of {len(self.files)})"
