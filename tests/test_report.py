"""The report stage on a fake data/ tree laid out as the train and evaluate stages write it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import layout, report
from stages.core import study_tables
from stages.core.ogbench_names import parse_task, task_name

REPO = Path(__file__).resolve().parent.parent
CUBE, PUZZLE = "cube-single-play-v0", "puzzle-3x3-play-v0"
CUBE2, CUBE3 = "cube-single-play-singletask-task2-v0", "cube-single-play-singletask-task3-v0"
PUZZLE2, PUZZLE3 = "puzzle-3x3-play-singletask-task2-v0", "puzzle-3x3-play-singletask-task3-v0"
# in the paper: RQL 100 on both puzzle tasks, FQL 79 and 83 (environment means: 100 and 70)
EPISODES = 20
T95_1 = 12.706  # Student t quantile, 1 degree of freedom (two seeds)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def successes(agent: str, task: str, seed: int) -> int:
    """Distinct, known successes out of EPISODES for every run."""
    base = {"rql": 10, "bc_flow": 2, "rql_cached": 6}[agent]
    return base + {CUBE2: 0, CUBE3: 4, PUZZLE2: 7, PUZZLE3: 1}[task] + 3 * seed


def write_tsv(path: Path, name: str, steps: list[int], values: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{1_700_000_000_000 + s}\t{s}\t{v}" for s, v in zip(steps, values)]
    path.write_text("\n".join([f"timestamp\tstep\t{name}", *rows]) + "\n")


def make_study(root: Path, datasets: list[str], numbers: list[int], seeds: list[int],
               agents: dict[str, list[str]]) -> list[str]:
    """params.yaml plus every file the report reads, for ``agents`` x ``datasets`` x task ``numbers`` x ``seeds``;
    returns the runs."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(datasets=datasets, tasks=numbers, seeds=seeds, agents=agents)
    params["evaluate"]["episodes"] = EPISODES
    params["evaluate"]["video"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs = [run for group in agents.values() for run in group]
    steps = params["train"]["steps"]
    for agent in runs:
        for dataset, number in ((dataset, number) for dataset in datasets for number in numbers):
            task = task_name(dataset, number)
            for seed in seeds:
                k = successes(agent, task, seed)
                eval_path = root / layout.eval_json(agent, dataset, number, seed)
                eval_path.parent.mkdir(parents=True, exist_ok=True)
                eval_path.write_text(json.dumps({
                    "agent": agent, "task": task, "seed": seed, "steps": steps, "success": 100 * k / EPISODES,
                    "success_ci95": list(wilson(k, EPISODES)), "env_id": task, "episodes": [],
                    "summary": {"episodes": EPISODES, "successes": k, "mean_return": -100.0 + k,
                                "mean_length": 400.0, "wall_time_s": 3.5},
                }))
                run = root / layout.run_dir(agent, dataset, number, seed)
                cached = agent == "rql_cached"
                cache = {"method": "exact", "rows": 1000, "median": 1e-7, "p99": 5e-7, "max": 1e-6,
                         "histogram": {"edges": [1e-8, 1e-7, 1e-6], "counts": [600, 400]}} if cached else None
                (run / "summary.json").parent.mkdir(parents=True, exist_ok=True)
                (run / "summary.json").write_text(json.dumps({
                    "agent": agent, "task": task, "seed": seed, "steps": steps, "platform": "cpu",
                    "reversal": {"rql": "online", "rql_cached": "cached"}.get(agent, "none"), "refresh_every": 0, "resumed_from": 0,
                    "wall_time_s": 12.0, "steps_per_second": steps / 12.0, "cache": cache,
                }))
                metrics = run / "live" / "plots" / "metrics"
                write_tsv(metrics / "train" / "critic_loss.tsv", "critic_loss", [500, 1000], [1.0, 0.5])
                write_tsv(metrics / "eval" / "success.tsv", "success", [2500, steps], [5.0, 99.0])
                if cached:
                    for name, start in (("cache_drift_median", 1e-6), ("cache_drift_p90", 2e-6),
                                        ("cache_drift_rel", 1e-5)):
                        write_tsv(metrics / "train" / f"{name}.tsv", name, [500, 1000], [start, start * 100])
    return runs


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every table of a Markdown page as a list of {column: cell} rows."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip().strip("|").split(" | ")))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def table_with(tables: list[list[dict[str, str]]], column: str) -> dict[str, dict[str, str]]:
    """The first table that has ``column``, keyed by its first column."""
    for rows in tables:
        if rows and column in rows[0]:
            first = next(iter(rows[0]))
            return {row[first]: row for row in rows}
    raise AssertionError(f"no table with a column {column!r}")


def run_report(root: Path, monkeypatch) -> tuple[str, dict]:
    monkeypatch.chdir(root)
    report.main(["--params", "params.yaml"])
    out = root / "reports"
    return (out / "index.md").read_text(), json.loads((out / report.SUMMARY_FILE).read_text())


AGENTS = {"rql": ["rql"], "rql_cached": ["rql_cached"], "fql": [], "bc_flow": ["bc_flow"]}


def test_one_seed_tables_use_the_wilson_interval_and_average_by_environment(tmp_path, monkeypatch):
    tasks = [CUBE2, CUBE3, PUZZLE2, PUZZLE3]
    make_study(tmp_path, [CUBE, PUZZLE], [2, 3], [0], AGENTS)
    text, summary = run_report(tmp_path, monkeypatch)
    tables = markdown_tables(text)

    per_task = table_with(tables, "paper RQL")
    for task in tasks:
        k = successes("rql", task, 0)
        low, high = wilson(k, EPISODES)
        assert per_task[task]["rql"] == f"{100 * k / EPISODES:.1f} [{low:.1f}, {high:.1f}] (n=1)"
        assert per_task[task]["environment"] == ("puzzle-3x3" if task in (PUZZLE2, PUZZLE3) else "cube-single")
    assert per_task[PUZZLE2]["paper RQL"] == "100" and per_task[PUZZLE2]["paper FQL"] == "79"
    assert per_task[CUBE2]["paper RQL"] == "-"
    assert "Wilson interval over the 20 episodes of the single seed" in text

    # Per environment: the mean over its tasks; overall: the mean over environments (not over tasks).
    envs = table_with(tables, "paper RQL (5 tasks)")
    cube = np.mean([100 * successes("rql", t, 0) / EPISODES for t in (CUBE2, CUBE3)])
    puzzle = np.mean([100 * successes("rql", t, 0) / EPISODES for t in (PUZZLE2, PUZZLE3)])
    assert envs["cube-single"]["rql"] == f"{cube:.1f}" and envs["cube-single"]["tasks"] == "2"
    assert envs["puzzle-3x3"]["rql"] == f"{puzzle:.1f}"  # one seed: no interval on the means
    assert envs[study_tables.OVERALL]["rql"] == f"{(cube + puzzle) / 2:.1f}" and envs[study_tables.OVERALL]["tasks"] == "4"
    assert envs["puzzle-3x3"]["paper RQL (these tasks)"] == "100"
    assert envs["puzzle-3x3"]["paper FQL (5 tasks)"] == "70"
    assert envs["cube-single"]["paper RQL (5 tasks)"] == "-" and envs[study_tables.OVERALL]["paper RQL (5 tasks)"] == "-"

    assert summary["seeds"] == 1 and summary["episodes"] == EPISODES
    assert set(summary["success"]) == {"rql", "rql_cached", "bc_flow"}

    # The reversal table: the agents whose train summary says they reverse their flow, and how.
    reversal = [row for row in next(t for t in tables if t and "reversal" in t[0]) if row["task"] == CUBE2]
    assert {row["agent"]: row["reversal"] for row in reversal} == {"rql": "online", "rql_cached": "cached"}
    rql = summary["success"]["rql"]
    assert rql["task"] == {parse_task(t).key: 100 * successes("rql", t, 0) / EPISODES for t in tasks}
    assert set(rql["task"]) == {"cube-single-play-task2", "cube-single-play-task3", "puzzle-3x3-play-task2",
                                "puzzle-3x3-play-task3"}
    assert rql["env"] == {"cube-single": pytest.approx(cube, abs=0.005), "puzzle-3x3": pytest.approx(puzzle, abs=0.005)}
    assert rql["overall"] == pytest.approx((cube + puzzle) / 2, abs=0.005)

    # One reversal cache per dataset, whichever of its tasks the cached runs trained on.
    caches = table_with(tables, "median error")
    assert sorted(caches) == [CUBE, PUZZLE] and caches[CUBE]["method"] == "exact"

    out = tmp_path / "reports"
    html = (out / "index.html").read_text()
    assert "Wilson interval over the 20 episodes" in html
    for name in ("success_by_agent.png", "learning_curves.png", "training_metrics.png", "cache_drift.png",
                 "roundtrip_error.png"):
        assert (out / "figures" / name).stat().st_size > 0, name
    assert "cache_drift_rel" in text  # the staleness caption explains the plotted metrics
    assert not (tmp_path / ".reports.partial").exists()


def test_several_seeds_use_the_t_interval_over_seeds(tmp_path, monkeypatch):
    tasks = [CUBE2, PUZZLE2]
    make_study(tmp_path, [CUBE, PUZZLE], [2], [0, 1], {"rql": ["rql"], "rql_cached": [], "fql": [], "bc_flow": ["bc_flow"]})
    text, summary = run_report(tmp_path, monkeypatch)
    tables = markdown_tables(text)

    def t_cell(values: list[float]) -> str:
        mean, half = np.mean(values), T95_1 * np.std(values, ddof=1) / math.sqrt(len(values))
        return f"{mean:.1f} [{max(0.0, mean - half):.1f}, {min(100.0, mean + half):.1f}]"

    per_task = table_with(tables, "paper RQL")
    for task in tasks:
        values = [100 * successes("bc_flow", task, s) / EPISODES for s in (0, 1)]
        assert per_task[task]["bc_flow"] == t_cell(values) + " (n=2)"
    assert "Student t interval over 2 seeds" in text

    envs = table_with(tables, "paper RQL (5 tasks)")
    per_seed_overall = [np.mean([100 * successes("rql", t, s) / EPISODES for t in tasks]) for s in (0, 1)]
    assert envs[study_tables.OVERALL]["rql"] == t_cell(per_seed_overall)
    assert envs["puzzle-3x3"]["rql"] == t_cell([100 * successes("rql", PUZZLE2, s) / EPISODES for s in (0, 1)])

    assert summary["seeds"] == 2
    assert summary["success"]["bc_flow"]["task"]["cube-single-play-task2"] == pytest.approx(
        np.mean([100 * successes("bc_flow", CUBE2, s) / EPISODES for s in (0, 1)]))
    assert summary["success"]["rql"]["overall"] == pytest.approx(np.mean(per_seed_overall), abs=0.005)


def test_build_summary_from_the_eval_frame():
    rows = [{"agent": a, "task": t, "seed": s, "success": v, "ci_low": 0.0, "ci_high": 100.0, "episodes": 50}
            for a, t, s, v in [("rql", CUBE2, 0, 10.0), ("rql", CUBE2, 1, 30.0), ("rql", CUBE3, 0, 50.0),
                               ("rql", CUBE3, 1, 70.0), ("rql", PUZZLE2, 0, 90.0), ("rql", PUZZLE2, 1, 100.0)]]
    summary = study_tables.build_summary(pd.DataFrame(rows))
    assert summary == {
        "success": {"rql": {"overall": 67.5, "env": {"cube-single": 40.0, "puzzle-3x3": 95.0},
                            "task": {"cube-single-play-task2": 20.0, "cube-single-play-task3": 60.0,
                                     "puzzle-3x3-play-task2": 95.0}}},
        "seeds": 2, "episodes": 50,
    }
    # stable keys: another run of the same study with other numbers has exactly the same columns
    other = study_tables.build_summary(pd.DataFrame(rows).assign(success=lambda d: 100 - d.success))

    def keys(tree, prefix=""):
        return {k for key, value in tree.items()
                for k in (keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key})}

    assert keys(other) == keys(summary)


def test_a_missing_or_corrupt_eval_json_is_an_error_naming_the_file(tmp_path, monkeypatch):
    make_study(tmp_path, [CUBE, PUZZLE], [2], [0], {"rql": ["rql"], "rql_cached": [], "fql": [], "bc_flow": []})
    monkeypatch.chdir(tmp_path)
    target = layout.eval_json("rql", PUZZLE, 2, 0)
    good = target.read_text()

    target.unlink()
    with pytest.raises(FileNotFoundError, match=str(target)):
        report.main(["--params", "params.yaml"])
    target.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{target}: unreadable JSON"):
        report.main(["--params", "params.yaml"])
    record = json.loads(good)
    del record["summary"]["episodes"]
    target.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"{target}: not a valid evaluation record \(missing summary.episodes"):
        report.main(["--params", "params.yaml"])
    record = json.loads(good) | {"success": 150.0}
    target.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"{target}: not a valid evaluation record"):
        report.main(["--params", "params.yaml"])
    assert not (tmp_path / "reports").exists() and not (tmp_path / ".reports.partial").exists()


def test_a_rerun_replaces_the_figures_and_leaves_other_files_alone(tmp_path, monkeypatch):
    make_study(tmp_path, [CUBE], [2], [0], {"rql": ["rql"], "rql_cached": [], "fql": [], "bc_flow": []})
    out = tmp_path / "reports"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    run_report(tmp_path, monkeypatch)
    assert not (out / "figures" / "stale.png").exists() and (out / "figures" / "success_by_agent.png").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["figures", "index.html", "index.md", "notes.txt",
                                                      "summary.json"]


def test_one_walk_reads_each_runs_evaluation_summary_and_curves_ending_with_the_final_success(tmp_path):
    from stages.core import study_results

    make_study(tmp_path, [CUBE], [2], [0, 1], {"rql": ["rql"], "bc_flow": ["bc_flow"]})
    runs = [study_results.Run(agent, CUBE2, seed, tmp_path / layout.eval_json(agent, CUBE, 2, seed),
                              tmp_path / layout.run_dir(agent, CUBE, 2, seed))
            for agent in ("rql", "bc_flow") for seed in (0, 1)]  # fmt: skip
    results = study_results.collect(runs)
    assert list(zip(results.evals.agent, results.evals.seed)) == [("rql", 0), ("rql", 1), ("bc_flow", 0),
                                                                  ("bc_flow", 1)]  # fmt: skip
    assert list(results.summaries.reversal) == ["online", "online", "none", "none"]
    success = results.curves[(results.curves.metric == "eval/success") & (results.curves.agent == "rql")
                             & (results.curves.seed == 1)]  # fmt: skip
    steps = yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["steps"]
    # the logged 99.0 at the last step is replaced by the final evaluation's success
    assert list(success.step) == [2500, steps] and success.value.iloc[-1] == 100 * successes("rql", CUBE2, 1) / 20
    (tmp_path / layout.run_dir("bc_flow", CUBE, 2, 1) / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"bc_flow/.*seed1/summary.json: missing; rerun its training"):
        study_results.collect(runs)


def test_environment_and_overall_means_weigh_each_environment_the_same():
    rows = [{"agent": "rql", "task": task, "seed": 0, "success": value, "ci_low": 0.0, "ci_high": 100.0,
             "episodes": 10} for task, value in ((CUBE2, 10.0), (CUBE3, 30.0), (PUZZLE2, 80.0))]  # fmt: skip
    stats = study_tables.aggregate_stats(pd.DataFrame(rows)).set_index("environment")
    assert stats.loc["cube-single", "mean"] == 20.0 and stats.loc["puzzle-3x3", "mean"] == 80.0
    assert stats.loc[study_tables.OVERALL, "mean"] == 50.0  # (20 + 80) / 2, not the mean over three tasks
    assert stats.loc[study_tables.OVERALL, "tasks"] == 3 and math.isnan(stats.loc["cube-single", "low"])
