"""The evaluate stage as a user sees it: a whole ``python -m stages.evaluate`` process, start to exit, against the
reference's in-process evaluation loop on the same exported policy and the same number of episodes.

For every repeat the stage runs as a subprocess, with JAX's persistent compilation cache cold (an empty folder) and
warm (a folder filled by an unmeasured run first), via $RQL_JAX_CACHE. Printed per setting, as min-max over the
repeats:

* wall: process start to exit, and the CPU time of the stage and its workers (less sensitive to other jobs on
  the machine than wall times, which rise with them);
* start-up: process start to the end of the first episode (the stage's $RQL_EVAL_TIMELINE hook; see
  stages.core.rollout), and to the first env step ("envs ready": workers up, policy compiled);
* steady state: episodes / (last episode end - first env step), episodes per second;
* video tail: from the last episode's end until the GIF episode's frames are there.

The reference loop (benchmarks/evaluation_speed.py's ``reference_way``: one env, a policy call per step) runs in
this process: its episodes, and its total with env creation and compilation (in-process, an evaluation during
training pays no imports). ``--repo`` may be given several times (e.g. a checkout of the old code) to time the
stages side by side, alternating within each repeat; a checkout without the timeline hook gets wall times only.

Needs a trained policy at <repo>/data/runs/<agent>/<dataset>/task<k>/seed<s>/policy.msgpack (the train stages'
output) and the dataset, task number, agent and seed in the repo's params.yaml.

    MUJOCO_GL=egl .venv/bin/python benchmarks/evaluate_stage.py --agent rql --repeats 3
    MUJOCO_GL=egl .venv/bin/python benchmarks/evaluate_stage.py --repo . --repo /tmp/old-checkout --no-reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from stages import layout  # paths only: this process stays light
from stages.core.ogbench_names import task_name

TIMELINE_ENV = "RQL_EVAL_TIMELINE"  # stages.core.rollout.TIMELINE_ENV (not imported: this process stays light)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", default=None, help="repository to run the stage in (repeatable)")
    parser.add_argument("--agent", default="rql")
    parser.add_argument("--dataset", default="cube-single-play-v0")
    parser.add_argument("--task", type=int, default=2, help="task number of the dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml", help="params file, relative to each repo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    parser.add_argument("--bytecode", action="store_true",
                        help="let the stage's processes cache bytecode in a private folder (PYTHONPYCACHEPREFIX), "
                             "as a venv with .pyc files would; off: as this environment is")
    args = parser.parse_args(argv)
    args.task_name = task_name(args.dataset, args.task)  # OGBench's singletask name
    return args


def run_stage(repo: Path, args: argparse.Namespace, cache: Path, pycache: Path | None) -> dict:
    """One stage process; returns wall time, timeline offsets from process start and the stage's summary."""
    fd, timeline = tempfile.mkstemp(prefix="timeline.", suffix=".tsv")
    os.close(fd)
    env = {**os.environ, TIMELINE_ENV: timeline, "RQL_JAX_CACHE": str(cache)}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    cmd = [sys.executable, "-m", "stages.evaluate", "--agent", args.agent, "--dataset", args.dataset, "--task",
           str(args.task), "--seed", str(args.seed), "--params", args.params, "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and its workers (it waits for them)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"stage failed in {repo} (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    events = {}
    for line in Path(timeline).read_text().splitlines():
        name, stamp = line.split("\t")
        events.setdefault(name, float(stamp) - start)
    os.unlink(timeline)
    record = json.loads((repo / layout.eval_json(args.agent, args.dataset, args.task, args.seed)).read_text())
    return {"wall": wall, "cpu": cpu, "events": events, "summary": record["summary"], "episodes": record["episodes"]}


def figures(run: dict) -> dict:
    ev, s = run["events"], run["summary"]
    out = {"wall": run["wall"], "cpu": run["cpu"]}
    if {"envs ready", "first episode end", "episodes done"} <= ev.keys():
        out["start-up"] = ev["first episode end"]
        out["first step"] = ev["envs ready"]
        out["steady ep/s"] = s["episodes"] / (ev["episodes done"] - ev["envs ready"])
        if "videos done" in ev:
            out["video tail"] = ev["videos done"] - ev["episodes done"]
    return out


def span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if len(values) == 1 or f"{lo:{fmt[2:-1]}}" == f"{hi:{fmt[2:-1]}}" else \
        f"{fmt.format(lo)}-{fmt.format(hi)}"


def reference(args: argparse.Namespace, policy: Path, episodes: int) -> dict:
    """The reference loop in this process: env creation + compilation, then the episodes."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import evaluation_speed as es
    import gymnasium
    import jax
    import numpy as np

    from stages.core.ogbench_names import resolve_env_id

    start = time.perf_counter()
    sample_one, _, _ = es.load_exported_policies(str(policy), args.task_name)
    env = es.ChunkQueue(es.StepMonitor(gymnasium.make(resolve_env_id(args.task_name))))
    obs, _ = env.reset(seed=0)
    np.asarray(sample_one(obs, jax.random.PRNGKey(0)))  # compile
    setup = time.perf_counter() - start
    ref = es.reference_way(env, sample_one, episodes, args.seed, progress=False)
    env.close()
    return {"setup": setup, "loop": ref["wall"], "total": setup + ref["wall"], "successes": sum(ref["successes"]),
            "mean_length": float(np.mean(ref["lengths"])), "steady ep/s": episodes / ref["wall"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    repos = [Path(r).resolve() for r in (args.repo or [str(ROOT)])]
    for repo in repos:
        if not (repo / layout.run_dir(args.agent, args.dataset, args.task, args.seed) / "policy.msgpack").is_file():
            raise SystemExit(f"no policy for ({args.agent}, {args.task_name}, seed {args.seed}) in {repo}/data/runs")
    bytecode = "private pyc cache" if args.bytecode else (
        "no bytecode cache (PYTHONDONTWRITEBYTECODE)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "default")
    print(f"evaluate stage: {args.agent} on {args.task_name} seed {args.seed}; {args.repeats} repeats; {os.cpu_count()} "
          f"CPUs; bytecode: {bytecode}; load average {_load()}")
    scratch = Path(tempfile.mkdtemp(prefix="evaluate-stage-bench."))
    runs: dict[tuple[Path, str], list[dict]] = {}
    try:
        pycache = scratch / "pycache" if args.bytecode else None
        warm = {repo: scratch / f"warm-{i}" for i, repo in enumerate(repos)}
        for repo in repos:  # unmeasured: fills the warm compilation caches (and the bytecode cache)
            run_stage(repo, args, warm[repo], pycache)
        for r in range(args.repeats):
            for repo in repos:
                for mode in ("cold", "warm"):
                    cache = scratch / f"cold-{r}-{repo.name}" if mode == "cold" else warm[repo]
                    run = run_stage(repo, args, cache, pycache)
                    runs.setdefault((repo, mode), []).append(run)
                    print(f"  repeat {r + 1} {repo} {mode}: wall {run['wall']:.2f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    first = next(iter(runs.values()))[0]
    episodes = first["summary"]["episodes"]
    success = sum(e["success"] for e in first["episodes"])
    for key, group in runs.items():
        if [e for run in group for e in run["episodes"]] != first["episodes"] * len(group):
            print(f"WARNING: {key[0]} {key[1]}: episodes differ from the first run's")
    print(f"{episodes} episodes, success {success}/{episodes}, mean length "
          f"{sum(e['length'] for e in first['episodes']) / episodes:.1f} (identical in every run)")
    walls = {}
    for (repo, mode), group in runs.items():
        figs = [figures(run) for run in group]
        walls[(repo, mode)] = [f["wall"] for f in figs]
        parts = [f"wall {span(walls[(repo, mode)], '{:.2f}')} s (CPU {span([f['cpu'] for f in figs], '{:.1f}')} s)"]
        if "start-up" in figs[0]:
            parts += [(f"start-up {span([f['start-up'] for f in figs], '{:.2f}')} s to the first episode end "
                       f"({span([f['first step'] for f in figs], '{:.2f}')} s to the first step)"),
                      f"steady {span([f['steady ep/s'] for f in figs], '{:.1f}')} ep/s"]
            if "video tail" in figs[0]:
                parts.append(f"video tail {span([f['video tail'] for f in figs], '{:.2f}')} s")
        print(f"stage {repo} [{mode} compilation cache]: " + ", ".join(parts))

    if not args.no_reference:
        policy = repos[0] / layout.run_dir(args.agent, args.dataset, args.task, args.seed) / "policy.msgpack"
        refs = [reference(args, policy, episodes) for _ in range(args.reference_repeats)]
        print(f"reference loop (in process): episodes {span([x['loop'] for x in refs], '{:.2f}')} s, with env "
              f"creation + compilation {span([x['total'] for x in refs], '{:.2f}')} s, steady "
              f"{span([x['steady ep/s'] for x in refs], '{:.1f}')} ep/s; success {refs[0]['successes']}/{episodes}, "
              f"mean length {refs[0]['mean_length']:.1f}")
        for (repo, mode), w in walls.items():
            lo, hi = min(x["total"] for x in refs) / max(w), max(x["total"] for x in refs) / min(w)
            print(f"speedup of the whole stage {repo} [{mode}] over the reference loop: {lo:.2f}-{hi:.2f}x")
    print(f"load average {_load()}")


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
