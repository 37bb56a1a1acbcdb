"""The outer training loop: fused update calls, periodic logging, checkpoints, evaluation and cache refresh.

The loop is agent-agnostic. It calls ``update(state, data) -> (state, metrics)`` (K updates per call, jitted, state
donated) and never reads a device value between calls except at a log, checkpoint or evaluation boundary, so the
device runs ahead of the host. Metrics of the calls since the last boundary are fetched together, checked for
non-finite values (stopping with :class:`NonFiniteLossError` before anything is saved, so the last good checkpoint
stays the newest), averaged and handed to ``on_metrics``.

A run resumed from a checkpoint at step S replays exactly the calls after S: the PRNG key lives in the state, the
schedule is a pure function of the step, and a refreshed reversal cache is rebuilt from the restored state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from stages.core.schedule import Schedule


class NonFiniteLossError(RuntimeError):
    """A training metric became NaN or infinite; ``metric``, ``first_step`` and ``last_step`` say which and when."""

    def __init__(self, message: str, *, metric: str = "", first_step: int = 0, last_step: int = 0) -> None:
        super().__init__(message)
        self.metric, self.first_step, self.last_step = metric, first_step, last_step


class MetricHistory:
    """Every logged row of a run, ``[step, {name: value}]`` in logging order, as JSON-able lists.

    Saved with each checkpoint and restored on resume, so a resumed run reports the whole learning curve: the rows
    up to the checkpoint come from it, the later ones are logged again by the replayed steps.
    """

    def __init__(self, rows: list | None = None) -> None:
        self.rows: list[list[Any]] = []
        for row in rows or []:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], int)
                    and isinstance(row[1], dict)):
                raise ValueError(f"metric history row {row!r} is not [step, {{name: value}}]")
            self.record(row[0], row[1])

    def record(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append([int(step), {str(name): float(value) for name, value in metrics.items()}])

    def upto(self, step: int) -> MetricHistory:
        """The rows logged at or before ``step``."""
        return MetricHistory([row for row in self.rows if row[0] <= step])


class Checkpointer(Protocol):
    def save(self, step: int, state: Any, *, force: bool = False, **kwargs: Any) -> bool: ...


def check_finite(metrics: dict[str, np.ndarray], first_step: int, last_step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the metric and step range if any value is NaN/inf."""
    for name, value in metrics.items():
        if not np.all(np.isfinite(value)):
            raise NonFiniteLossError(
                f"{name} became non-finite ({np.asarray(value).ravel()[~np.isfinite(np.asarray(value).ravel())][0]}) "
                f"between update steps {first_step} and {last_step}; training stopped, the last good checkpoint "
                "is kept (lower the learning rate or check the data)",
                metric=name, first_step=first_step, last_step=last_step,
            )


def _mean_metrics(pending: list[dict[str, jax.Array]], first_step: int, last_step: int) -> dict[str, float]:
    fetched = jax.device_get(pending)
    stacked = {name: np.stack([np.asarray(m[name]) for m in fetched]) for name in fetched[0]}
    check_finite(stacked, first_step, last_step)
    return {name: float(np.mean(values)) for name, values in stacked.items()}


def run(
    state: Any,
    data: Any,
    update: Callable[[Any, Any], tuple[Any, dict]],
    schedule: Schedule,
    *,
    start_step: int = 0,
    checkpointer: Checkpointer | None = None,
    on_metrics: Callable[[int, dict[str, float], Any, Any], None] | None = None,
    on_eval: Callable[[int, Any], None] | None = None,
    eval_at_end: bool = True,
    refresh: Callable[[Any, Any], Any] | None = None,
    swap: Callable[[int, Any], Any] | None = None,
    checkpoint_extras: Callable[[], dict[str, Any]] | None = None,
    progress: bool = True,
    description: str = "train",
) -> Any:
    """Train from ``start_step`` to ``schedule.total_steps``; returns the final state.

    ``refresh(state, data) -> data`` rebuilds the data's reversal cache from the current actor; it is called at
    every ``refresh_every`` boundary and once at the start of a resumed run (so the cache matches the restored
    actor exactly as in the uninterrupted run). ``on_metrics(step, means, state, data)`` gets the mean metrics of
    the calls since the previous boundary. ``on_eval(step, state)`` runs at ``eval_every`` boundaries and, with
    ``eval_at_end``, after the last step. ``swap(step, data) -> data`` replaces the data (the next file of a
    multi-file dataset) at every ``swap_every`` boundary; a resumed run must start with the file of its start step.
    The final state is always checkpointed. At a step that is both an evaluation and a checkpoint boundary the
    evaluation runs first, so what ``on_metrics`` and ``on_eval`` logged up to a checkpoint's step is all done when
    it is saved: ``checkpoint_extras()`` (a JSON-able dict, e.g. the metric history) is saved with each checkpoint.
    """
    if start_step % schedule.updates_per_call or start_step > schedule.total_steps:
        raise ValueError(f"start_step {start_step} is not a call boundary of {schedule}")
    if refresh is not None and schedule.due(start_step, schedule.refresh_every) and start_step > 0:
        data = refresh(state, data)  # checkpoints fall on refresh boundaries (see Schedule)
    pending: list[dict[str, jax.Array]] = []
    window_start = start_step
    step = start_step
    clock = time.perf_counter()
    bar = tqdm(total=schedule.total_steps, initial=start_step, desc=description, unit="step", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)

    def flush() -> None:
        nonlocal pending, window_start, clock
        if not pending:
            return
        means = _mean_metrics(pending, window_start + 1, step)
        now = time.perf_counter()
        means["steps_per_second"] = (step - window_start) / max(now - clock, 1e-9)
        if on_metrics is not None:
            on_metrics(step, means, state, data)
        bar.set_postfix({k: f"{means[k]:.3g}" for k in ("critic_loss", "bc_loss") if k in means})
        pending, window_start, clock = [], step, now

    try:
        while step < schedule.total_steps:
            state, metrics = update(state, data)
            step += schedule.updates_per_call
            pending.append(metrics)
            bar.update(schedule.updates_per_call)
            final = step == schedule.total_steps
            if final or schedule.due(step, schedule.log_every) or schedule.due(step, schedule.checkpoint_every):
                flush()
            if on_eval is not None and (eval_at_end if final else schedule.due(step, schedule.eval_every)):
                flush()
                on_eval(step, state)
                clock = time.perf_counter()  # evaluation time is not training time
            if checkpointer is not None and (final or schedule.due(step, schedule.checkpoint_every)):
                if checkpoint_extras is None:
                    checkpointer.save(step, state, force=final)
                else:
                    checkpointer.save(step, state, force=final, extras=checkpoint_extras())
            if swap is not None and not final and schedule.due(step, schedule.swap_every):
                flush()
                data = swap(step, data)
                clock = time.perf_counter()
            if refresh is not None and not final and schedule.due(step, schedule.refresh_every):
                flush()
                data = refresh(state, data)
                clock = time.perf_counter()
    finally:
        bar.close()
    return state
