"""Matplotlib figures for the report, drawn from tidy pandas tables and saved as byte-stable PNGs.

Every function takes plain data and returns a ``matplotlib.figure.Figure``; ``save_png`` writes it atomically with
no timestamp in the PNG metadata, so the same data gives the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stages.core.files import atomic_path

AGENT_COLORS = {"rql": "#1f77b4", "fql": "#ff7f0e", "bc_flow": "#2ca02c"}
FALLBACK_COLORS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def color_for(name: str, order: list[str]) -> str:
    """A stable colour per agent/variant name."""
    if name in AGENT_COLORS:
        return AGENT_COLORS[name]
    others = [n for n in order if n not in AGENT_COLORS]
    return FALLBACK_COLORS[others.index(name) % len(FALLBACK_COLORS)] if name in others else "#333333"


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` atomically (temp + rename) with byte-stable metadata, then close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def _grid(n: int, width: float = 4.6, height: float = 3.2) -> tuple[Figure, np.ndarray]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for axis in axes.flat[n:]:
        axis.set_visible(False)
    return figure, axes


def _short(task: str) -> str:
    return task.replace("-singletask", "").removesuffix("-v0")


def mean_band(values: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Mean of ``y`` per ``x`` over seeds, with a normal 95% band (zero width for a single seed)."""
    grouped = values.groupby(x)[y]
    stats = grouped.agg(["mean", "std", "count"]).reset_index()
    half = 1.96 * stats["std"].fillna(0.0) / np.sqrt(stats["count"].clip(lower=1))
    stats["low"], stats["high"] = stats["mean"] - half, stats["mean"] + half
    return stats


def learning_curves(curves: pd.DataFrame, y: str = "success", ylabel: str = "success rate (%)") -> Figure:
    """One panel per task: ``y`` against training step for every agent (mean over seeds, 95% band).

    ``curves`` columns: agent, task, seed, step, and ``y``.
    """
    tasks = sorted(curves["task"].unique())
    agents = sorted(curves["agent"].unique())
    figure, axes = _grid(len(tasks))
    for axis, task in zip(axes.flat, tasks):
        for agent in agents:
            rows = curves[(curves["task"] == task) & (curves["agent"] == agent)]
            if rows.empty:
                continue
            stats = mean_band(rows, "step", y)
            color = color_for(agent, agents)
            axis.plot(stats["step"], stats["mean"], marker="o", ms=3, color=color, label=agent)
            axis.fill_between(stats["step"], stats["low"], stats["high"], color=color, alpha=0.2, lw=0)
        axis.set_title(_short(task), fontsize=10)
        axis.set_xlabel("training step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def agent_comparison(stats: pd.DataFrame, paper: dict[tuple[str, str], float], interval: str) -> Figure:
    """Final success per task and agent as bars with their 95% interval, the paper's figure as a star.

    ``stats`` columns: agent, task, mean, low, high (success %, one row per agent and task, as
    ``stages.core.study_tables.task_stats`` gives); ``paper`` maps (agent, task) to a published success (%);
    ``interval`` names the interval the error bars show (e.g. "95% Wilson interval, 50 episodes"), for the legend.
    """
    tasks = sorted(stats["task"].unique())
    agents = sorted(stats["agent"].unique())
    figure, axis = plt.subplots(figsize=(max(5.5, 1.0 + 0.9 * len(tasks) * max(1, len(agents))), 3.8))
    width = 0.8 / max(1, len(agents))
    bars_labelled, interval_labelled, paper_labelled = set(), False, False
    for a, agent in enumerate(agents):
        for t, task in enumerate(tasks):
            rows = stats[(stats["task"] == task) & (stats["agent"] == agent)]
            if rows.empty:
                continue
            row = rows.iloc[0]
            position = t + (a - (len(agents) - 1) / 2) * width
            axis.bar(position, row["mean"], width=width * 0.9, color=color_for(agent, agents),
                     label=None if agent in bars_labelled else agent)
            bars_labelled.add(agent)
            axis.errorbar(position, row["mean"], yerr=[[row["mean"] - row["low"]], [row["high"] - row["mean"]]],
                          color="black", capsize=3, lw=1, label=None if interval_labelled else interval)
            interval_labelled = True
            if (agent, task) in paper:
                axis.plot(position, paper[(agent, task)], marker="*", color="black", ms=9, ls="none",
                          label=None if paper_labelled else "paper")
                paper_labelled = True
    axis.set_xticks(range(len(tasks)), [_short(t) for t in tasks], fontsize=8, rotation=10)
    axis.set_ylabel("success rate (%)")
    axis.set_ylim(0, 105)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    figure.tight_layout()
    return figure


def metric_curves(metrics: pd.DataFrame, names: list[str], log_names: tuple[str, ...] = ()) -> Figure:
    """One panel per metric name: value against step, one line per (agent, task), mean over seeds.

    ``metrics`` columns: agent, task, seed, step, metric, value. Panels of ``log_names`` get a log y-axis (when
    their values are positive).
    """
    present = [name for name in names if name in set(metrics["metric"])]
    figure, axes = _grid(max(1, len(present)), width=4.2, height=2.9)
    labels = sorted({f"{a} {_short(t)}" for a, t in zip(metrics["agent"], metrics["task"])})
    for axis, name in zip(axes.flat, present):
        rows = metrics[metrics["metric"] == name]
        for (agent, task), group in rows.groupby(["agent", "task"]):
            stats = mean_band(group, "step", "value")
            label = f"{agent} {_short(task)}"
            axis.plot(stats["step"], stats["mean"], color=color_for(agent, sorted(rows["agent"].unique())),
                      label=label if len(labels) > 1 else agent)
        if name in log_names and (rows["value"] > 0).all():
            axis.set_yscale("log")
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def roundtrip_histogram(histograms: dict[str, dict]) -> Figure:
    """Per-chunk round-trip error (max |forward(reverse(a)) - a|) histograms, one series per label.

    Each histogram is ``{"edges": [...], "counts": [...]}`` with log-spaced edges.
    """
    figure, axis = plt.subplots(figsize=(5.2, 3.2))
    for label, histogram in histograms.items():
        edges = np.asarray(histogram["edges"], dtype=np.float64)
        axis.stairs(np.asarray(histogram["counts"]), edges, fill=True, alpha=0.5, label=label)
    axis.set_xscale("log")
    axis.set_xlabel("round-trip error (max abs, per chunk)")
    axis.set_ylabel("chunks")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


