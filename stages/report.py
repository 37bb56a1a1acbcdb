"""Stage ``report``: every evaluation, training curve and reversal diagnostic -> ``reports/index.html`` (+ ``.md``).

    python -m stages.report

The HTML page is self-contained (images inlined) and works offline; ``index.md`` is its Markdown twin with the
figures in ``reports/figures/``. ``reports/summary.json`` is the study's compact metrics file for ``dvc exp show``
(stages.core.study_tables.build_summary): success per agent and task, per environment and overall, and the seeds
and episodes. How the numbers are aggregated: stages.core.study_tables; what the page says:
stages.core.report_content.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from stages import cli, layout
from stages.params import load_params

log = logging.getLogger("stages.report")
SUMMARY_FILE = "summary.json"  # in the report folder: the study's metrics for `dvc exp show`
TITLE = "RQL study report"


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


def write_report(params, params_path: Path, staging: Path) -> dict:
    """Write ``index.html``, ``index.md`` and ``figures/`` into ``staging``; return the summary metrics."""
    from stages.core import report_content, study_results
    from stages.core.report_page import render_html, render_markdown
    from stages.core.study_tables import build_summary

    tasks = params.study_tasks
    runs = [study_results.Run(agent, task.name, seed, layout.eval_json(agent, *task, seed),
                              layout.run_dir(agent, *task, seed))
            for agent in params.agents.runs for task in tasks for seed in params.seeds]  # fmt: skip
    results = study_results.collect(runs)
    agents, first, seed = list(params.agents.runs), tasks[0], params.seeds[0]
    gifs = {agent: layout.eval_gif(agent, *first, seed) for agent in agents}
    sections = report_content.sections(results, agents, [task.name for task in tasks], params.seeds, gifs,
                                       params_path.read_text(), staging / "figures")  # fmt: skip
    subtitle = (f"{len(params.datasets)} dataset(s) x {len(params.tasks)} task(s) x {len(params.seeds)} seed(s) x "
                f"agents {', '.join(agents)}; {params.train.steps} training steps; {params.evaluate.episodes} "
                f"evaluation episodes per run.")
    (staging / "index.html").write_text(render_html(TITLE, subtitle, sections))
    (staging / "index.md").write_text(render_markdown(TITLE, subtitle, sections, staging))
    return build_summary(results.evals)


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


if __name__ == "__main__":
    cli.run(main)
