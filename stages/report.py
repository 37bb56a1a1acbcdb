"""Stage ``report``: every evaluation, training curve and reversal diagnostic -> ``reports/index.html`` (+ ``.md``).

    python -m stages.report

The HTML page is self-contained (images inlined) and works offline; ``index.md`` is its Markdown twin with the
figures in ``reports/figures/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from stages import cli, layout
from stages.params import load_params

log = logging.getLogger("stages.report")
LOSS_METRICS = ["critic_loss", "bc_loss", "actor_loss", "q_mean", "target_q_mean", "distill_loss"]
DRIFT_METRICS = ["cache_drift_mean", "cache_stale_fraction"]
REVERSAL_AGENTS = ("rql", "rql_cached", "rql_refresh")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc}); rerun the stage that writes it") from exc


def collect_evals(params) -> pd.DataFrame:
    """One row per configured (agent, task, seed): final success (%) and its episode-level Wilson interval."""
    rows = []
    for agent in params.agents.runs:
        for task in params.tasks:
            for seed in params.seeds:
                path = layout.eval_json(agent, task, seed)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing evaluation; run `dvc repro` (evaluate stage)")
                record = read_json(path)
                summary = record["summary"]
                rows.append({"agent": agent, "task": task, "seed": seed, "steps": record.get("steps"),
                             "success": float(record["success"]), "ci_low": record["success_ci95"][0],
                             "ci_high": record["success_ci95"][1], "episodes": summary["episodes"],
                             "mean_return": summary["mean_return"], "mean_length": summary["mean_length"],
                             "eval_time_s": summary["wall_time_s"]})
    return pd.DataFrame(rows)


def collect_summaries(params) -> pd.DataFrame:
    rows = []
    for agent in params.agents.runs:
        for task in params.tasks:
            for seed in params.seeds:
                record = read_json(layout.run_dir(agent, task, seed) / "summary.json")
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
    """Mean and 95% interval over seeds (Student t); one seed: that seed's episode-level Wilson interval."""
    n = len(values)
    mean = float(np.mean(values))
    if n == 1:
        return mean, low, high
    half = T95.get(n - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, max(0.0, mean - half), min(100.0, mean + half)


def success_table(evals: pd.DataFrame, agents: list[str]) -> pd.DataFrame:
    from stages.core.paper_numbers import paper_success

    rows = []
    for task, group in evals.groupby("task", sort=True):
        row = {"task": task}
        for agent in agents:
            runs = group[group.agent == agent]
            if runs.empty:
                continue
            mean, low, high = seed_interval(runs["success"].to_numpy(), runs["ci_low"].min(), runs["ci_high"].max())
            row[agent] = f"{mean:.1f} [{low:.1f}, {high:.1f}] (n={len(runs)})"
        for agent in ("rql", "fql"):
            published = paper_success(agent, task)
            row[f"paper {agent.upper()}"] = "-" if published is None else f"{published:.0f}"
        rows.append(row)
    return pd.DataFrame(rows)


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

    from stages.core import figures
    from stages.core.paper_numbers import paper_success
    from stages.core.report_page import Figure, Section, render_html, render_markdown

    out = Path(args.out)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    fig_dir = staging / "figures"
    fig_dir.mkdir(parents=True)

    evals = collect_evals(params)
    summaries = collect_summaries(params)
    curves = collect_curves(params, evals)
    agents = list(params.agents.runs)
    sections = []

    paper = {(a, t): v for a in ("rql", "fql") for t in params.tasks if (v := paper_success(a, t)) is not None}
    comparison = figures.save_png(figures.agent_comparison(evals, paper), fig_dir / "success_by_agent.png")
    sections.append(Section(
        "Success rate",
        paragraphs=[("Final evaluation of each run's evaluated policy (RQL, BC-flow: the EMA flow actor; FQL: its "
                    "one-step policy) over the configured episodes. Cells: mean over seeds [95% interval] (n seeds); "
                    "with one seed the interval is the Wilson interval over its episodes. Paper columns: published "
                    "success (%) where the task is in the paper (RQL: 4 seeds; FQL: 12 seeds, 1M steps).")],
        tables=[success_table(evals, agents)],
        figures=[Figure(comparison, "Final success per task and agent; stars: the paper's numbers.")],
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
        reversal_figures.append(Figure(figures.save_png(figures.metric_curves(drift, DRIFT_METRICS),
                                                        fig_dir / "cache_drift.png"),
                                       "Cache staleness: distance between the dataset chunk and the current "
                                       "actor's flow from the cached x_0, and the share of rows beyond 1e-2."))
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

    sections.append(Section("Params", preformatted=Path(args.params).read_text()))
    title = "RQL study report"
    subtitle = (f"{len(params.tasks)} task(s) x {len(params.seeds)} seed(s) x agents {', '.join(agents)}; "
                f"{params.train.steps} training steps; {params.evaluate.episodes} evaluation episodes per run.")
    (staging / "index.html").write_text(render_html(title, subtitle, sections))
    (staging / "index.md").write_text(render_markdown(title, subtitle, sections, staging))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log.info("report written to %s", out / "index.html")


if __name__ == "__main__":
    cli.run(main)
