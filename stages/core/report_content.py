"""What the study report says: its sections (text, tables, figures) from a study's results.

Figures are written into ``fig_dir`` as they are made; rendering the sections as HTML and Markdown is
stages.core.report_page's job.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from stages.core import figures
from stages.core.paper_numbers import PAPER_AGENTS, paper_success
from stages.core.report_page import Figure, Section
from stages.core.study_results import Results
from stages.core.study_tables import (
    cache_summaries,
    environment_table,
    interval_note,
    reversal_table,
    success_table,
    task_stats,
)

LOSS_METRICS = ["critic_loss", "bc_loss", "actor_loss", "q_mean", "target_q_mean", "distill_loss"]
# The cache-staleness metrics the cached train runs log (stages.core.cache_build.drift; dvclive train/<name>) and
# the report plots; the ones on a log axis. The one place the report names them.
DRIFT_METRICS = ("cache_drift_median", "cache_drift_p90", "cache_drift_rel")
DRIFT_LOG_METRICS = ("cache_drift_median", "cache_drift_p90")

SUCCESS_PER_TASK = (
    "Final evaluation of each run's evaluated policy (RQL, BC-flow: the EMA flow actor; FQL: its one-step policy) "
    "over the configured episodes. Per task: mean over seeds [95% interval] (n seeds); shown here: the {note} (one "
    "seed: the Wilson interval over its episodes; several: the Student t interval over seeds). Paper columns: "
    "published success (%) where the task is in the paper (RQL: 4 seeds; FQL: 12 seeds, 1M steps)."
)
SUCCESS_PER_ENVIRONMENT = (
    "Per environment: the mean over its configured tasks; overall: the mean over environments, each weighing the "
    "same, as the paper reports. Their 95% interval is over seeds and is shown only with several seeds. Paper "
    "columns: the published per-task numbers averaged over the same tasks, and the published mean over all five "
    "tasks of the environment (which only matches when all five are configured)."
)
DRIFT_CAPTION = (
    "Cache staleness on a fixed subset of cached rows: the current actor's flow from each cached x_0 against the "
    "dataset chunk. cache_drift_median, cache_drift_p90: quantiles of the per-row max-abs distance (log scale; the "
    "round-trip error's unit: ~1e-6 for a fresh exact cache); cache_drift_rel: the RMS distance relative to the "
    "chunks' RMS (0: the cache still lands on the chunks, 1: misses as large as the chunks themselves). A refresh "
    "brings them back down."
)
REVERSAL_TEXT = (
    "Online reversal (the paper) reverses every batch through the current actor; the cache holds the reversal "
    "through the BC prior (optionally refreshed from the current actor). Round-trip error: max "
    "|sampler(x_0) - chunk| per chunk."
)
TIME_COLUMNS = ["agent", "task", "seed", "steps", "reversal", "wall_time_s", "steps_per_second", "resumed_from",
                "platform"]  # fmt: skip


def success_section(results: Results, agents: list[str], tasks: list[str], fig_dir: Path) -> Section:
    stats = task_stats(results.evals)
    note = interval_note(stats)
    paper = {(a, t): v for a in PAPER_AGENTS for t in tasks if (v := paper_success(a, t)) is not None}
    comparison = figures.save_png(figures.agent_comparison(stats, paper, note), fig_dir / "success_by_agent.png")
    caption = f"Final success per task and agent; error bars: {note}; stars: the paper's numbers."
    return Section("Success rate", paragraphs=[SUCCESS_PER_TASK.format(note=note), SUCCESS_PER_ENVIRONMENT],
                   tables=[success_table(results.evals, agents), environment_table(results.evals, agents)],
                   figures=[Figure(comparison, caption)])  # fmt: skip


def curve_sections(curves: pd.DataFrame, fig_dir: Path) -> list[Section]:
    """Learning curves (success against steps) and training metrics, where the runs logged them."""
    sections = []
    success = curves[curves.metric == "eval/success"].rename(columns={"value": "success"})
    if not success.empty:
        path = figures.save_png(figures.learning_curves(success), fig_dir / "learning_curves.png")
        sections.append(Section("Learning curves", paragraphs=[
            "Success (%) against training steps: evaluations during training (train.eval_every) and the final one."],
            figures=[Figure(path, "Success rate against training step (mean over seeds, 95% band).")]))  # fmt: skip
    losses = train_metrics(curves)
    if not losses.empty:
        path = figures.save_png(figures.metric_curves(losses, LOSS_METRICS), fig_dir / "training_metrics.png")
        sections.append(Section("Training metrics", figures=[Figure(path, "Losses and Q statistics (dvclive).")]))
    return sections


def train_metrics(curves: pd.DataFrame) -> pd.DataFrame:
    """The ``train/`` series, named without the prefix."""
    return curves[curves.metric.str.startswith("train/")].assign(metric=lambda d: d.metric.str[6:])


def reversal_section(results: Results, tasks: list[str], seed: int, fig_dir: Path) -> Section | None:
    """The caches' round-trip error and staleness, and each agent's reversal mode; None when no agent reverses."""
    histograms, error_rows = cache_summaries(results.summaries, tasks, seed)
    shown, tables = [], []
    if histograms:
        path = figures.save_png(figures.roundtrip_histogram(histograms), fig_dir / "roundtrip_error.png")
        shown.append(Figure(path, "Round-trip error of the cached reversal through the prior."))
        tables.append(error_rows)
    drift = train_metrics(results.curves)
    drift = drift[drift.metric.isin(DRIFT_METRICS)]
    if not drift.empty:
        path = figures.save_png(figures.metric_curves(drift, list(DRIFT_METRICS), DRIFT_LOG_METRICS),
                                fig_dir / "cache_drift.png")  # fmt: skip
        shown.append(Figure(path, DRIFT_CAPTION))
    modes = reversal_table(results.evals, results.summaries)
    if not modes.empty:
        tables.append(modes)
    return Section("Flow reversal", paragraphs=[REVERSAL_TEXT], tables=tables, figures=shown) if shown or tables \
        else None  # fmt: skip


def times_section(results: Results) -> Section:
    times = results.summaries[TIME_COLUMNS].merge(results.evals[["agent", "task", "seed", "eval_time_s"]],
                                                  on=["agent", "task", "seed"])  # fmt: skip
    return Section("Run times", tables=[times.round(2)])


def rollouts_section(gifs: dict[str, Path], task: str, seed: int, fig_dir: Path) -> Section | None:
    """The rollout GIF of each agent (``gifs``: agent -> its evaluate stage's GIF), copied beside the figures."""
    shown = []
    for agent, gif in gifs.items():
        if gif.is_file():
            target = fig_dir / f"rollout-{agent}.gif"
            shutil.copyfile(gif, target)
            shown.append(Figure(target, f"{agent} on {task}, seed {seed} (first episode)."))
    return Section("Rollouts", figures=shown) if shown else None


def sections(results: Results, agents: list[str], tasks: list[str], seeds: list[int], gifs: dict[str, Path],
             params_text: str, fig_dir: Path) -> list[Section]:  # fmt: skip
    """Every section of the report, in order."""
    found = [success_section(results, agents, tasks, fig_dir), *curve_sections(results.curves, fig_dir),
             reversal_section(results, tasks, seeds[0], fig_dir), times_section(results),
             rollouts_section(gifs, tasks[0], seeds[0], fig_dir), Section("Params", preformatted=params_text)]  # fmt: skip
    return [section for section in found if section is not None]
