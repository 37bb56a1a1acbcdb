"""Stage ``report``: every evaluation, training curve and reversal diagnostic -> ``reports/index.html`` (+ ``.md``).

    python -m stages.report

The HTML page is self-contained (images inlined) and works offline; ``index.md`` is its Markdown twin with the
figures in ``reports/figures/``. ``reports/summary.json`` is the study's compact metrics file for ``dvc exp show``
(see :func:`build_summary`): success per agent and task, per environment and overall, and the seeds and episodes.

Aggregation, as the paper reports: a task's success is the mean over seeds; an environment's (the OGBench family,
e.g. ``cube-single``, ``puzzle-4x4-100m``: see :func:`environment`) the mean over its tasks; the overall one the mean
over environments (each environment weighs the same, as in the paper's mean over its 10 environments).
Intervals (95%): over seeds (Student t) when there are several; with one seed a task's is the Wilson interval over
its evaluation episodes, and environment and overall means have none.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from stages import cli, layout
from stages.core.ogbench_names import environment, parse_task
from stages.params import load_params

log = logging.getLogger("stages.report")
LOSS_METRICS = ["critic_loss", "bc_loss", "actor_loss", "q_mean", "target_q_mean", "distill_loss"]
# The cache-staleness metrics the cached train runs log (stages.core.cache_build.drift; dvclive train/<name>) and
# the report plots; the ones on a log axis. The one place the report names them.
DRIFT_METRICS = ("cache_drift_median", "cache_drift_p90", "cache_drift_rel")
DRIFT_LOG_METRICS = ("cache_drift_median", "cache_drift_p90")
REVERSAL_AGENTS = ("rql", "rql_cached", "rql_refresh")
PAPER_AGENTS = ("rql", "fql")  # agents with published numbers (stages.core.paper_numbers)
SUMMARY_FILE = "summary.json"  # in the report folder: the study's metrics for `dvc exp show`
OVERALL = "all environments"  # the label of the overall row of the environment table
# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); beyond 30, the value at 30 (conservative).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
       29: 2.045, 30: 2.042}
EVAL_FIELDS = ("success", "success_ci95", "summary")
EVAL_SUMMARY_FIELDS = ("episodes", "mean_return", "mean_length", "wall_time_s")


def read_json(path: Path, hint: str = "rerun the stage that writes it") -> dict:
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


def read_eval(path: Path, agent: str, task: str, seed: int) -> dict:
    """One evaluation record as a row of :func:`collect_evals`, checked field by field (errors name the file)."""
    hint = "rerun its evaluation (`dvc repro`, evaluate stage)"
    record = read_json(path, hint)
    try:
        missing = [k for k in EVAL_FIELDS if k not in record]
        missing += [f"summary.{k}" for k in EVAL_SUMMARY_FIELDS if k not in record.get("summary", {})]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        for key, expected in (("agent", agent), ("task", task), ("seed", seed)):
            if key in record and record[key] != expected:
                raise ValueError(f"{key} is {record[key]!r}, expected {expected!r}")
        summary = record["summary"]
        low, high = (float(v) for v in record["success_ci95"])
        success = float(record["success"])
        slack = 1e-6  # float rounding of the interval's ends
        if not -slack <= low <= success + slack <= high + 2 * slack <= 100.0 + 3 * slack:
            raise ValueError(f"success {success} and its interval [{low}, {high}] are not percentages in order")
        return {"agent": agent, "task": task, "seed": seed, "steps": record.get("steps"), "success": success,
                "ci_low": low, "ci_high": high, "episodes": int(summary["episodes"]),
                "mean_return": float(summary["mean_return"]), "mean_length": float(summary["mean_length"]),
                "eval_time_s": float(summary["wall_time_s"])}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a valid evaluation record ({exc}); {hint}") from exc


def collect_evals(params) -> pd.DataFrame:
    """One row per configured (agent, task, seed): final success (%) and its episode-level Wilson interval."""
    rows = [read_eval(layout.eval_json(agent, task, seed), agent, task, seed)
            for agent in params.agents.runs for task in params.tasks for seed in params.seeds]
    return pd.DataFrame(rows)


def collect_summaries(params) -> pd.DataFrame:
    rows = []
    for agent in params.agents.runs:
        for task in params.tasks:
            for seed in params.seeds:
                record = read_json(layout.run_dir(agent, task, seed) / "summary.json",
                                   "rerun its training (`dvc repro`, train stage)")
                rows.append({key: record.get(key) for key in ("agent", "task", "seed", "steps", "reversal",
                                                                "refresh_every", "wall_time_s", "steps_per_second",
                                                                "resumed_from", "platform")})
    return pd.DataFrame(rows)


def read_dvclive_series(live_dir: Path) -> pd.DataFrame:
    """All scalar series a dvclive folder holds: columns metric ('train/critic_loss', ...), step, value."""
    frames = []
    root = live_dir / "plots" / "metrics"
    for path in sorted(root.rglob("*.tsv")) if root.exists() else []:
        table = pd.read_csv(path, sep="\t")
        name = path.relative_to(root).with_suffix("").as_posix()
        value_column = table.columns[-1]
        frames.append(pd.DataFrame({"metric": name, "step": table["step"], "value": table[value_column]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["metric", "step", "value"])


def collect_curves(params, evals: pd.DataFrame) -> pd.DataFrame:
    """Every run's dvclive series plus its final evaluation as the last point of ``eval/success``."""
    frames = []
    for agent in params.agents.runs:
        for task in params.tasks:
            for seed in params.seeds:
                series = read_dvclive_series(layout.run_dir(agent, task, seed) / "live")
                final = evals[(evals.agent == agent) & (evals.task == task) & (evals.seed == seed)]
                if not final.empty and final.iloc[0]["steps"] is not None:
                    series = pd.concat([series[~((series.metric == "eval/success")
                                                 & (series.step == final.iloc[0]["steps"]))],
                                        pd.DataFrame({"metric": ["eval/success"], "step": [final.iloc[0]["steps"]],
                                                      "value": [final.iloc[0]["success"]]})], ignore_index=True)
                frames.append(series.assign(agent=agent, task=task, seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def seed_interval(values: np.ndarray, low: float, high: float) -> tuple[float, float, float]:
    """Mean and 95% interval over seeds (Student t); one seed: the interval given (``low``, ``high``)."""
    n = len(values)
    mean = float(np.mean(values))
    if n == 1:
        return mean, low, high
    half = T95.get(n - 1, T95[30]) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, max(0.0, mean - half), min(100.0, mean + half)


def task_stats(evals: pd.DataFrame) -> pd.DataFrame:
    """Per (agent, task): mean success over seeds with its 95% interval, and which interval it is.

    Columns: agent, task, environment, mean, low, high, seeds, episodes (per run, the fewest), interval ("wilson":
    one seed, the Wilson interval over its episodes; "t": the Student t interval over seeds).
    """
    rows = []
    for (agent, task), runs in evals.groupby(["agent", "task"], sort=True):
        mean, low, high = seed_interval(runs["success"].to_numpy(), float(runs["ci_low"].iloc[0]),
                                        float(runs["ci_high"].iloc[0]))
        rows.append({"agent": agent, "task": task, "environment": environment(task), "mean": mean, "low": low,
                     "high": high, "seeds": len(runs), "episodes": int(runs["episodes"].min()),
                     "interval": "wilson" if len(runs) == 1 else "t"})
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
                         "high": high, "seeds": len(group)})
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
    from stages.core.paper_numbers import paper_success

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
    from stages.core.paper_numbers import paper_env_mean, paper_success

    stats = aggregate_stats(evals).set_index(["agent", "environment"])
    tasks_of = {env: sorted(group["task"].unique())
                for env, group in evals.assign(environment=evals["task"].map(environment)).groupby("environment")}
    paper_same = {(a, env): _mean_or_none([paper_success(a, t) for t in tasks]) for a in PAPER_AGENTS
                  for env, tasks in tasks_of.items()}
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

    Keys are agent names, :func:`environment` names and :func:`task_key` names, so they are the same in every run
    of the same study; values are rounded to 0.01.
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
    chosen = summaries[summaries.agent.isin(REVERSAL_AGENTS)]
    rows = []
    for (agent, task), group in chosen.groupby(["agent", "task"], sort=True):
        success = evals[(evals.agent == agent) & (evals.task == task)]["success"]
        first = group.iloc[0]
        mode = first["reversal"] + (f" + refresh every {first['refresh_every']}" if first["refresh_every"] else "")
        rows.append({"agent": agent, "task": task, "reversal": mode, "success (%)": f"{success.mean():.1f}",
                     "train wall time (s)": f"{group['wall_time_s'].mean():.0f}",
                     "steps/s": f"{group['steps_per_second'].astype(float).mean():.1f}"})
    return pd.DataFrame(rows)


def cache_summaries(params) -> tuple[dict[str, dict], list[dict]]:
    """Round-trip error summaries of the reversal caches, as the cached runs read them (one per task)."""
    histograms, rows = {}, []
    for task in params.tasks:
        for agent in params.agents.rql_cached:
            cache = read_json(layout.run_dir(agent, task, params.seeds[0]) / "summary.json").get("cache")
            if not cache:
                continue
            histograms[f"{task.replace('-singletask', '')} ({cache['method']})"] = cache["histogram"]
            rows.append({"task": task, "method": cache["method"], "rows": cache["rows"],
                         "median error": f"{cache['median']:.2e}", "p99 error": f"{cache['p99']:.2e}",
                         "max error": f"{cache['max']:.2e}"})
            break
    return histograms, rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=str(layout.REPORTS))
    args = parser.parse_args(argv)
    params = load_params(args.params)

    out = Path(args.out)
    staging = out.parent / f".{out.name}.partial"  # beside the report folder, removed at the end
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "figures").mkdir(parents=True)
    try:
        summary = write_report(params, Path(args.params), staging)
        publish(staging, out, summary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("report written to %s (metrics: %s)", out / "index.html", out / SUMMARY_FILE)


def publish(staging: Path, out: Path, summary: dict) -> None:
    """Move the finished report from ``staging`` into ``out``: ``figures/`` replaced as a whole, ``index.html`` and
    ``index.md`` by rename, ``summary.json`` written atomically last (so a complete metrics file means a complete
    report). Nothing else in ``out`` is touched."""
    out.mkdir(parents=True, exist_ok=True)
    figures_dir = out / "figures"
    if figures_dir.exists():
        shutil.rmtree(figures_dir)
    (staging / "figures").rename(figures_dir)
    for name in ("index.html", "index.md"):
        os.replace(staging / name, out / name)
    cli.write_json(out / SUMMARY_FILE, summary)


def write_report(params, params_path: Path, staging: Path) -> dict:
    """Write ``index.html``, ``index.md`` and ``figures/`` into ``staging``; return the summary metrics."""
    from stages.core import figures
    from stages.core.paper_numbers import paper_success
    from stages.core.report_page import Figure, Section, render_html, render_markdown

    fig_dir = staging / "figures"
    evals = collect_evals(params)
    summaries = collect_summaries(params)
    curves = collect_curves(params, evals)
    agents = list(params.agents.runs)
    sections = []

    stats = task_stats(evals)
    note = interval_note(stats)
    paper = {(a, t): v for a in PAPER_AGENTS for t in params.tasks if (v := paper_success(a, t)) is not None}
    comparison = figures.save_png(figures.agent_comparison(stats, paper, note), fig_dir / "success_by_agent.png")
    sections.append(Section(
        "Success rate",
        paragraphs=[
            ("Final evaluation of each run's evaluated policy (RQL, BC-flow: the EMA flow actor; FQL: its "
             "one-step policy) over the configured episodes. Per task: mean over seeds [95% interval] (n seeds); "
             f"shown here: the {note} (one seed: the Wilson interval over its episodes; several: the Student t "
             "interval over seeds). Paper columns: published success (%) where the task is in the paper (RQL: 4 "
             "seeds; FQL: 12 seeds, 1M steps)."),
            ("Per environment: the mean over its configured tasks; overall: the mean over environments, each "
             "weighing the same, as the paper reports. Their 95% interval is over seeds and is shown only with "
             "several seeds. Paper columns: the published per-task numbers averaged over the same tasks, and the "
             "published mean over all five tasks of the environment (which only matches when all five are "
             "configured)."),
        ],
        tables=[success_table(evals, agents), environment_table(evals, agents)],
        figures=[Figure(comparison, f"Final success per task and agent; error bars: {note}; stars: the paper's "
                                    "numbers.")],
    ))

    success_curves = curves[curves.metric == "eval/success"].rename(columns={"value": "success"})
    if not success_curves.empty:
        path = figures.save_png(figures.learning_curves(success_curves), fig_dir / "learning_curves.png")
        sections.append(Section("Learning curves", paragraphs=[
            "Success (%) against training steps: evaluations during training (train.eval_every) and the final one."],
            figures=[Figure(path, "Success rate against training step (mean over seeds, 95% band).")]))

    losses = curves[curves.metric.str.startswith("train/")].assign(metric=lambda d: d.metric.str[6:])
    if not losses.empty:
        path = figures.save_png(figures.metric_curves(losses, LOSS_METRICS), fig_dir / "training_metrics.png")
        sections.append(Section("Training metrics", figures=[Figure(path, "Losses and Q statistics (dvclive).")]))

    histograms, error_rows = cache_summaries(params)
    reversal_figures, reversal_tables = [], []
    if histograms:
        reversal_figures.append(Figure(figures.save_png(figures.roundtrip_histogram(histograms),
                                                        fig_dir / "roundtrip_error.png"),
                                       "Round-trip error of the cached reversal through the prior."))
        reversal_tables.append(pd.DataFrame(error_rows))
    drift = losses[losses.metric.isin(DRIFT_METRICS)]
    if not drift.empty:
        reversal_figures.append(Figure(
            figures.save_png(figures.metric_curves(drift, list(DRIFT_METRICS), DRIFT_LOG_METRICS),
                             fig_dir / "cache_drift.png"),
            ("Cache staleness on a fixed subset of cached rows: the current actor's flow from each cached x_0 "
             "against the dataset chunk. cache_drift_median, cache_drift_p90: quantiles of the per-row max-abs "
             "distance (log scale; the round-trip error's unit: ~1e-6 for a fresh exact cache); cache_drift_rel: "
             "the RMS distance relative to the chunks' RMS (0: the cache still lands on the chunks, 1: misses as "
             "large as the chunks themselves). A refresh brings them back down.")))
    modes = reversal_table(evals, summaries)
    if not modes.empty:
        reversal_tables.append(modes)
    if reversal_figures or reversal_tables:
        sections.append(Section("Flow reversal", paragraphs=[
            ("Online reversal (the paper) reverses every batch through the current actor; the cache holds the "
            "reversal through the BC prior (optionally refreshed from the current actor). Round-trip error: max "
            "|sampler(x_0) - chunk| per chunk.")], tables=reversal_tables, figures=reversal_figures))

    times = summaries[["agent", "task", "seed", "steps", "reversal", "wall_time_s", "steps_per_second",
                       "resumed_from", "platform"]].merge(evals[["agent", "task", "seed", "eval_time_s"]],
                                                          on=["agent", "task", "seed"])
    sections.append(Section("Run times", tables=[times.round(2)]))

    gifs = []
    for agent in agents:
        gif = layout.eval_gif(agent, params.tasks[0], params.seeds[0])
        if gif.is_file():
            target = fig_dir / f"rollout-{agent}.gif"
            shutil.copyfile(gif, target)
            gifs.append(Figure(target, f"{agent} on {params.tasks[0]}, seed {params.seeds[0]} (first episode)."))
    if gifs:
        sections.append(Section("Rollouts", figures=gifs))

    sections.append(Section("Params", preformatted=params_path.read_text()))
    title = "RQL study report"
    subtitle = (f"{len(params.tasks)} task(s) x {len(params.seeds)} seed(s) x agents {', '.join(agents)}; "
                f"{params.train.steps} training steps; {params.evaluate.episodes} evaluation episodes per run.")
    (staging / "index.html").write_text(render_html(title, subtitle, sections))
    (staging / "index.md").write_text(render_markdown(title, subtitle, sections, staging))
    return build_summary(evals)


if __name__ == "__main__":
    cli.run(main)
