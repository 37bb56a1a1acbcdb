"""A study's numbers, aggregated as the paper reports them, as tables and as the compact metrics file.

A task's success is the mean over seeds; an environment's (``DatasetSpec.environment``: ``cube-single``,
``puzzle-4x4-100m``) the mean over its tasks; the overall one the mean over environments (each environment weighs
the same, as in the paper's mean over its 10 environments). Intervals (95%, stages.core.stats): over seeds
(Student t) when there are several; with one seed a task's is the Wilson interval over its evaluation episodes,
and environment and overall means have none. The inputs are the frames of stages.core.study_results.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stages.core.ogbench_names import dataset_for_task, environment, parse_task
from stages.core.paper_numbers import PAPER_AGENTS, paper_env_mean, paper_success
from stages.core.stats import seed_interval

OVERALL = "all environments"  # the label of the overall row of the environment table


def task_stats(evals: pd.DataFrame) -> pd.DataFrame:
    """Per (agent, task): mean success over seeds with its 95% interval, and which interval it is.

    Columns: agent, task, environment, mean, low, high, seeds, episodes (per run, the fewest), interval ("wilson":
    one seed, the Wilson interval over its episodes; "t": the Student t interval over seeds).
    """
    rows = []
    for (agent, task), runs in evals.groupby(["agent", "task"], sort=True):
        mean, low, high = seed_interval(runs["success"].to_numpy(), float(runs["ci_low"].iloc[0]),
                                        float(runs["ci_high"].iloc[0]))  # fmt: skip
        rows.append({"agent": agent, "task": task, "environment": environment(task), "mean": mean, "low": low,
                     "high": high, "seeds": len(runs), "episodes": int(runs["episodes"].min()),
                     "interval": "wilson" if len(runs) == 1 else "t"})  # fmt: skip
    return pd.DataFrame(rows)


def aggregate_stats(evals: pd.DataFrame) -> pd.DataFrame:
    """Per agent: the mean success of each environment (over its tasks) and overall (over environments).

    Each seed's environment mean is the mean over the environment's tasks, its overall mean the mean over
    environments; the row's mean and 95% Student t interval are over seeds (no interval with one seed: NaN).
    Columns: agent, environment (``OVERALL`` for the overall row), tasks, mean, low, high, seeds.
    """
    frame = evals.assign(environment=evals["task"].map(environment))
    per_env = frame.groupby(["agent", "environment", "seed"], sort=True)["success"].mean().reset_index()
    per_all = per_env.groupby(["agent", "seed"], sort=True)["success"].mean().reset_index()
    tasks = frame.groupby(["agent", "environment"])["task"].nunique()
    rows = []
    for source, keys in ((per_env, ["agent", "environment"]), (per_all.assign(environment=OVERALL), ["agent"])):
        for key, group in source.groupby(keys, sort=True):
            agent = key[0] if isinstance(key, tuple) else key
            name = group["environment"].iloc[0]
            mean, low, high = seed_interval(group["success"].to_numpy(), math.nan, math.nan)
            count = tasks[agent].sum() if name == OVERALL else tasks[(agent, name)]
            rows.append({"agent": agent, "environment": name, "tasks": int(count), "mean": mean, "low": low,
                         "high": high, "seeds": len(group)})  # fmt: skip
    return pd.DataFrame(rows)


def interval_note(stats: pd.DataFrame) -> str:
    """Which 95% interval the per-task numbers carry, in words (for captions and the figure legend)."""
    kinds = set(stats["interval"])
    if kinds == {"wilson"}:
        return f"95% Wilson interval over the {int(stats['episodes'].min())} episodes of the single seed"
    if kinds == {"t"}:
        return f"95% Student t interval over {int(stats['seeds'].min())} seeds"
    return "95% interval: Student t over seeds, Wilson over episodes where a task has one seed"


def _cell(mean: float, low: float, high: float) -> str:
    return f"{mean:.1f}" if math.isnan(low) else f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def success_table(evals: pd.DataFrame, agents: list[str]) -> pd.DataFrame:
    """Per task: each agent's mean over seeds [95% interval] (n seeds), and the paper's per-task numbers."""
    stats = task_stats(evals).set_index(["agent", "task"])
    rows = []
    for task in sorted(evals["task"].unique()):
        row = {"task": task, "environment": environment(task)}
        for agent in agents:
            if (agent, task) in stats.index:
                s = stats.loc[(agent, task)]
                row[agent] = f"{_cell(s['mean'], s['low'], s['high'])} (n={s['seeds']})"
        for agent in PAPER_AGENTS:
            row[f"paper {agent.upper()}"] = _paper(paper_success(agent, task))
        rows.append(row)
    return pd.DataFrame(rows)


def environment_table(evals: pd.DataFrame, agents: list[str]) -> pd.DataFrame:
    """Per environment, then overall: each agent's mean success (95% interval over seeds when there are several),
    beside the paper's mean over the same tasks and its published mean over the environment's five tasks."""
    stats = aggregate_stats(evals).set_index(["agent", "environment"])
    tasks_of = {env: sorted(group["task"].unique())
                for env, group in evals.assign(environment=evals["task"].map(environment)).groupby("environment")}
    paper_same = {(a, env): _mean_or_none([paper_success(a, t) for t in tasks]) for a in PAPER_AGENTS
                  for env, tasks in tasks_of.items()}  # fmt: skip
    paper_five = {(a, env): paper_env_mean(a, env) for a in PAPER_AGENTS for env in tasks_of}
    for a in PAPER_AGENTS:
        paper_same[(a, OVERALL)] = _mean_or_none([paper_same[(a, env)] for env in tasks_of])
        paper_five[(a, OVERALL)] = _mean_or_none([paper_five[(a, env)] for env in tasks_of])
    rows = []
    for env in [*sorted(tasks_of), OVERALL]:
        row = {"environment": env, "tasks": sum(map(len, tasks_of.values())) if env == OVERALL else len(tasks_of[env])}
        for agent in agents:
            if (agent, env) in stats.index:
                s = stats.loc[(agent, env)]
                row[agent] = _cell(s["mean"], s["low"], s["high"])
        for a in PAPER_AGENTS:
            row[f"paper {a.upper()} (these tasks)"] = _paper(paper_same[(a, env)])
            row[f"paper {a.upper()} (5 tasks)"] = _paper(paper_five[(a, env)])
        rows.append(row)
    return pd.DataFrame(rows)


def build_summary(evals: pd.DataFrame) -> dict:
    """The study's compact metrics (``reports/summary.json``, the columns of ``dvc exp show``), success in %::

        {"success": {"<agent>": {"overall": 31.0,                      # mean over environments
                                 "env": {"cube-single": 31.0, ...},    # mean over the environment's tasks
                                 "task": {"cube-single-play-task2": 31.0, ...}}},  # mean over seeds
         "seeds": 1,        # seeds per (agent, task) (the fewest)
         "episodes": 50}    # evaluation episodes per run (the fewest)

    Keys are agent, environment and task keys (``TaskSpec.key``), so they are the same in every run of the same
    study; values are rounded to 0.01.
    """
    per_task = task_stats(evals)
    per_env = aggregate_stats(evals)
    success = {}
    for agent in sorted(per_task["agent"].unique()):
        tasks = per_task[per_task["agent"] == agent]
        envs = per_env[per_env["agent"] == agent]
        success[agent] = {
            "overall": round(float(envs.loc[envs["environment"] == OVERALL, "mean"].iloc[0]), 2),
            "env": {e: round(float(m), 2) for e, m in zip(envs["environment"], envs["mean"]) if e != OVERALL},
            "task": {parse_task(t).key: round(float(m), 2) for t, m in zip(tasks["task"], tasks["mean"])},
        }
    return {"success": success, "seeds": int(per_task["seeds"].min()), "episodes": int(per_task["episodes"].min())}


def reversal_table(evals: pd.DataFrame, summaries: pd.DataFrame) -> pd.DataFrame:
    """Per agent that reverses its flow (its train summary's reversal: online or cached) and task: how it
    reverses, its success, its training time and speed."""
    chosen = summaries[summaries.reversal != "none"]
    rows = []
    for (agent, task), group in chosen.groupby(["agent", "task"], sort=True):
        success = evals[(evals.agent == agent) & (evals.task == task)]["success"]
        first = group.iloc[0]
        mode = first["reversal"] + (f" + refresh every {first['refresh_every']}" if first["refresh_every"] else "")
        rows.append({"agent": agent, "task": task, "reversal": mode, "success (%)": f"{success.mean():.1f}",
                     "train wall time (s)": f"{group['wall_time_s'].mean():.0f}",
                     "steps/s": f"{group['steps_per_second'].astype(float).mean():.1f}"})  # fmt: skip
    return pd.DataFrame(rows)


def cache_summaries(summaries: pd.DataFrame, tasks: list[str], seed: int) -> tuple[dict[str, dict], pd.DataFrame]:
    """Round-trip error of each dataset's reversal cache (one per dataset, shared by its tasks), as the first cached
    run of ``seed`` on one of ``tasks`` read it: the histograms by label, and a table."""
    cached = summaries[summaries["cache"].notna() & (summaries["seed"] == seed)]
    cached = cached.assign(dataset=cached["task"].map(dataset_for_task)).drop_duplicates("dataset")
    histograms, rows = {}, []
    for dataset in dict.fromkeys(map(dataset_for_task, tasks)):
        for cache in cached.loc[cached["dataset"] == dataset, "cache"]:
            histograms[f"{dataset} ({cache['method']})"] = cache["histogram"]
            rows.append({"dataset": dataset, "method": cache["method"], "rows": cache["rows"],
                         "median error": f"{cache['median']:.2e}", "p99 error": f"{cache['p99']:.2e}",
                         "max error": f"{cache['max']:.2e}"})  # fmt: skip
    return histograms, pd.DataFrame(rows)
