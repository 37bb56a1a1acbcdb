"""A study's results as three tables, read in one walk over its runs: final evaluations, train summaries, curves.

Each run is an (agent, task, seed) with its evaluation record (written by the evaluate stage) and its run folder
(``summary.json`` and dvclive's ``live/``, written by the train stage). A missing or malformed file is an error
naming it and the stage to rerun.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pandas as pd

EVAL_FIELDS = ("success", "success_ci95", "summary")
EVAL_SUMMARY_FIELDS = ("episodes", "mean_return", "mean_length", "wall_time_s")
SUMMARY_FIELDS = ("agent", "task", "seed", "steps", "reversal", "refresh_every", "wall_time_s", "steps_per_second",
                  "resumed_from", "platform", "cache")  # fmt: skip
EVAL_HINT = "rerun its evaluation (`dvc repro`, evaluate stage)"
TRAIN_HINT = "rerun its training (`dvc repro`, train stage)"


class Run(NamedTuple):
    """Where one run's results are."""

    agent: str
    task: str
    seed: int
    eval_json: Path
    run_dir: Path


class Results(NamedTuple):
    evals: pd.DataFrame  # per run: success (%), its Wilson interval (ci_low, ci_high), episodes, returns, times
    summaries: pd.DataFrame  # per run: SUMMARY_FIELDS of the train stage's summary.json
    curves: pd.DataFrame  # per run and metric: step, value (dvclive series; eval/success ends with the final one)


def read_json(path: Path, hint: str) -> dict:
    """The JSON object in ``path``; a missing, unreadable or non-object file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {hint}")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc}); {hint}") from exc
    if not isinstance(record, dict):
        raise TypeError(f"{path}: expected a JSON object, got {type(record).__name__}; {hint}")
    return record


def read_eval(run: Run) -> dict:
    """One evaluation record as a row of ``Results.evals``, checked field by field (errors name the file)."""
    record = read_json(run.eval_json, EVAL_HINT)
    try:
        missing = [k for k in EVAL_FIELDS if k not in record]
        missing += [f"summary.{k}" for k in EVAL_SUMMARY_FIELDS if k not in record.get("summary", {})]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        for key in ("agent", "task", "seed"):
            if key in record and record[key] != getattr(run, key):
                raise ValueError(f"{key} is {record[key]!r}, expected {getattr(run, key)!r}")
        summary = record["summary"]
        low, high = (float(v) for v in record["success_ci95"])
        success = float(record["success"])
        slack = 1e-6  # float rounding of the interval's ends
        if not -slack <= low <= success + slack <= high + 2 * slack <= 100.0 + 3 * slack:
            raise ValueError(f"success {success} and its interval [{low}, {high}] are not percentages in order")
        return {"agent": run.agent, "task": run.task, "seed": run.seed, "steps": record.get("steps"),
                "success": success, "ci_low": low, "ci_high": high, "episodes": int(summary["episodes"]),
                "mean_return": float(summary["mean_return"]), "mean_length": float(summary["mean_length"]),
                "eval_time_s": float(summary["wall_time_s"])}  # fmt: skip
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{run.eval_json}: not a valid evaluation record ({exc}); {EVAL_HINT}") from exc


def read_dvclive_series(live_dir: Path) -> pd.DataFrame:
    """All scalar series a dvclive folder holds: columns metric ('train/critic_loss', ...), step, value."""
    frames = []
    root = live_dir / "plots" / "metrics"
    for path in sorted(root.rglob("*.tsv")) if root.exists() else []:
        table = pd.read_csv(path, sep="\t")
        name = path.relative_to(root).with_suffix("").as_posix()
        frames.append(pd.DataFrame({"metric": name, "step": table["step"], "value": table[table.columns[-1]]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["metric", "step", "value"])


def _with_final_success(series: pd.DataFrame, final: dict) -> pd.DataFrame:
    """The series with the final evaluation as the last point of ``eval/success`` (replacing one at that step)."""
    if final["steps"] is None:
        return series
    same = (series.metric == "eval/success") & (series.step == final["steps"])
    point = pd.DataFrame({"metric": ["eval/success"], "step": [final["steps"]], "value": [final["success"]]})
    return pd.concat([series[~same], point], ignore_index=True)


def collect(runs: Iterable[Run]) -> Results:
    """Every run's evaluation, train summary and curves."""
    evals, summaries, curves = [], [], []
    for run in runs:
        evals.append(read_eval(run))
        record = read_json(run.run_dir / "summary.json", TRAIN_HINT)
        summaries.append({key: record.get(key) for key in SUMMARY_FIELDS})
        series = _with_final_success(read_dvclive_series(run.run_dir / "live"), evals[-1])
        curves.append(series.assign(agent=run.agent, task=run.task, seed=run.seed))
    return Results(pd.DataFrame(evals), pd.DataFrame(summaries),
                   pd.concat(curves, ignore_index=True) if curves else pd.DataFrame())  # fmt: skip
