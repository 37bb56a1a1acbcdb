"""``dvc repro`` on a Ray cluster: every stage a Ray task as soon as its upstream stages are done.

    python -m stages.cluster_repro [TARGET ...]                     # a local Ray instance: a parallel dvc repro
    python -m stages.cluster_repro --address HOST:6379 [TARGET ...]  # a running Ray cluster

The DVC remote and its run-cache are the only shared state: each task runs in a clone of the repository of its
own on its node, at this workspace's commit (``stages/cluster/worker.py``), and pushes the stage's outputs and run-
cache entry. At the end the accepted runs are restored here in one pass (``stages/cluster/restore.py``: every
output fetched in one batch and checked out, then ``dvc.lock`` written once, as a serial ``dvc repro`` writes it;
nothing reruns), and ``dvc status`` must find nothing changed. A failing stage stops only what depends on it; the
rest finishes and the command exits 1 naming the stage and its log. Rerunning reruns nothing that finished (it is restored from the run-cache).
Resources per stage kind: params.yaml's ``cluster`` section. Logs: one per stage in ``--logs``.

Each node needs the project's environment (``make setup``), ``ray start`` from it, git access to ``--git-url`` and
access to the DVC remote (credentials in its environment, or a ``config.local`` in its clone folder, copied into
every clone made there). ``RQL_CLUSTER_CLONES`` in a node's environment overrides ``--clones`` for that node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHECKPOINTS_ENV = "RQL_CHECKPOINTS"  # stages.layout.CHECKPOINTS_ENV (not imported: no stage code in the coordinator)

STATUS_STYLE = {"pending": "dim", "queued": "cyan", "running": "yellow", "ran": "green", "restored": "green",
                "failed": "bold red", "skipped": "red"}


class Display:
    """One line per transition (stage, state, node, time); in a terminal also a live table of what runs now."""

    def __init__(self, total: int, live: bool):
        from rich.console import Console

        self.console, self.total, self.live, self.began = Console(stderr=True), total, None, time.time()
        if live and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=2, transient=True)
            self.live.start()

    def transition(self, name: str, state: Any) -> None:
        if state.status == "pending":
            return
        clock = time.strftime("%H:%M:%S")
        took = f" {state.finished - state.started:7.1f} s" if state.finished else ""
        tries = f" (attempt {state.attempts})" if state.attempts > 1 else ""
        note = f"  {state.error}" if state.error else ""
        style = STATUS_STYLE.get(state.status, "")
        self.console.print(f"{clock} [{style}]{state.status:>8}[/] {name}  {state.node}{took}{tries}{note}",
                           highlight=False, markup=True, soft_wrap=True)

    def refresh(self, states: dict[str, Any]) -> None:
        if self.live is None:
            return
        from rich.table import Table

        counts: dict[str, int] = {}
        for state in states.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        table = Table(title=" ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
                      f"  ({time.time() - self.began:.0f} s)", title_justify="left")
        for column in ("stage", "status", "node", "for"):
            table.add_column(column)
        for name, state in states.items():
            if state.status in ("queued", "running"):
                table.add_row(name, f"[{STATUS_STYLE[state.status]}]{state.status}[/]", state.node,
                              f"{time.time() - state.started:.0f} s")
        self.live.update(table)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _git(workspace: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout.strip()


def _commit(workspace: Path) -> str:
    """HEAD, refusing a workspace whose tracked files (dvc.lock aside) differ from it: workers check out HEAD."""
    changed = [line[3:] for line in _git(workspace, "status", "--porcelain", "--untracked-files=no").splitlines()
               if line[3:] != "dvc.lock"]
    if changed:
        raise SystemExit(f"error: uncommitted changes in {', '.join(changed[:5])}: the workers check out the "
                         "commit, so commit (and push) them first")
    return _git(workspace, "rev-parse", "HEAD")


def _dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def restore(workspace: Path, names: list[str], accepted: dict[str, dict], log_path: Path
            ) -> tuple[bool, str, dict[str, float]]:
    """The accepted runs of ``names`` restored here in one pass (``stages/cluster/restore.py``: their outputs
    fetched and checked out, then dvc.lock written once), then ``dvc status`` of them in a new DVC process, which
    must find nothing changed: (restored and clean, log, seconds per phase)."""
    from stages.cluster.restore import restore_accepted

    lines: list[str] = []
    started = time.perf_counter()
    try:
        times = restore_accepted(workspace, names, accepted, lines.append)
    except Exception as error:  # noqa: BLE001 - RestoreError, or any of DVC's errors: the log names it
        lines.append(f"# FAILED: {type(error).__name__}: {error}")
        log_path.write_text("\n".join(lines) + "\n")
        return False, "\n".join(lines), {"total": time.perf_counter() - started}
    # Every stage, and the restored ones picked out of the answer: `dvc status <stage> ...` collects each target
    # on its own, which took 141 s for 100 stages where the whole project took 3 s.
    clock = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=workspace, env=_dvc_env(),
                            capture_output=True, text=True, check=False)
    times["status"] = time.perf_counter() - clock
    times["total"] = time.perf_counter() - started
    try:
        restored = set(names)
        changed = {name: why for name, why in json.loads(status.stdout).items() if name in restored}
        clean = status.returncode == 0 and not changed
    except (ValueError, AttributeError):
        changed, clean = {}, False
    lines.append(f"$ dvc status --json: exit {status.returncode} after {times['status']:.2f} s; of the {len(names)} "
                 f"restored stages changed: {json.dumps(changed) if changed else 'none'}\n{status.stderr.strip()}")
    if not clean:
        lines.append("# FAILED: dvc status finds stages changed after the restore")
    log_path.write_text("\n".join(lines) + "\n")
    return clean, "\n".join(lines), times


def lock_mismatches(workspace: Path, accepted: dict[str, dict]) -> list[str]:
    from stages.cluster.restore import load_lock

    stages = load_lock(workspace / "dvc.lock")
    return [name for name, entry in accepted.items() if stages.get(name) != entry]


def checkpoints_location(value: str | None, workspace: Path, local: bool) -> str | None:
    """What every task gets as RQL_CHECKPOINTS: a URL (``gs://bucket/ckpt``) as it is (Orbax writes it itself), an
    absolute path (``~`` is expanded on each node), or without either the workspace's data/checkpoints for a local
    instance (every local clone reaches it) and nothing on a cluster."""
    from stages.core.files import is_url

    if not value:
        return str(workspace / "data" / "checkpoints") if local else None
    if not is_url(value) and not Path(os.path.expanduser(value)).is_absolute():
        raise SystemExit(f"error: --checkpoints {value}: neither an absolute path nor a URL such as gs://bucket/ckpt "
                         "(a folder every node reaches)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.cluster_repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="stages as for dvc repro (default: all)")
    parser.add_argument("--address", help="a running Ray cluster (host:port or auto); default: a local instance")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local instance (default: all)")
    parser.add_argument("--git-url", help="where workers fetch the commit (default: with --address the git remote "
                        "'origin' if there is one, else this workspace's path)")
    parser.add_argument("--clones", help="folder of each node's clones (default: .dvc/tmp/cluster-clones here "
                        "without --address, else ~/.cache/rql-cluster/<name>)")
    parser.add_argument("--checkpoints", default=os.environ.get(CHECKPOINTS_ENV) or None,
                        help="training checkpoints in a folder every node reaches (absolute, or a gs:// URL that "
                        "Orbax writes itself), so a train task "
                        "retried on another node resumes instead of starting over (default: $RQL_CHECKPOINTS; "
                        "without --address data/checkpoints here, which every local clone reaches; a node's own "
                        "RQL_CHECKPOINTS wins)")
    parser.add_argument("--logs", default=".dvc/tmp/cluster-logs", help="one log per stage (default: %(default)s)")
    parser.add_argument("--no-live", action="store_true", help="transitions only, no live table")
    args = parser.parse_args(argv)

    workspace = Path.cwd().resolve()
    if not (workspace / "dvc.yaml").is_file():
        raise SystemExit("error: run it from the repository's root (no dvc.yaml here)")
    from stages.params import ParamsError, load_params

    try:
        params = load_params(workspace / "params.yaml")
    except ParamsError as error:
        raise SystemExit(f"error: {error}") from None
    commit = _commit(workspace)
    origin = subprocess.run(["git", "remote", "get-url", "origin"], cwd=workspace, capture_output=True, text=True,
                            check=False).stdout.strip()
    git_url = args.git_url or (origin if args.address and origin else str(workspace))
    clones = args.clones or (str(workspace / ".dvc" / "tmp" / "cluster-clones") if not args.address
                             else f"~/.cache/rql-cluster/{workspace.name}")
    logs = (workspace / args.logs).resolve()
    checkpoints = checkpoints_location(args.checkpoints, workspace, local=not args.address)
    logs.mkdir(parents=True, exist_ok=True)

    from stages.cluster.dag import load_dag

    dag = load_dag(workspace, args.targets)
    if dag.breakers:
        lines = "\n".join(f"  - {name}: {why}" for name, why in dag.breakers.items())
        raise SystemExit(f"error: these stages cannot be run through the run-cache:\n{lines}")

    from stages.cluster import reaper
    from stages.cluster.loopback import LOOPBACK, is_loopback, use_loopback

    reaper.start()  # whatever this process starts (the local Ray instance, the final restore) dies with it

    if not args.address or is_loopback(args.address):  # this machine only: nothing listens beyond 127.0.0.1
        use_loopback()
    # Ray's `uv run` hook (on when the driver runs under `uv run`, as `make` runs it) would start every worker with
    # `uv run` in a copy of the workspace uploaded to the cluster: they failed to start (no .tools/bin/uv in the
    # copy) and the run hung. Every node has the project's environment already (`make setup`).
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    import ray

    from stages.cluster.scheduler import Scheduler, stage_resources, write_summary

    if args.address:
        ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False, _node_ip_address=LOOPBACK)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        has_gpus = any(node["Resources"].get("GPU", 0) > 0 for node in nodes)
        max_cpus = max((node["Resources"].get("CPU", 0) for node in nodes), default=1)
        resources = {name: stage_resources(name, params, has_gpus, max_cpus) for name in dag.order}
        display = Display(len(dag.order), live=not args.no_live)
        display.console.print(f"{len(dag.order)} stages at {commit[:10]} (from {git_url}) on {len(nodes)} node(s)"
                              f"{' with GPUs' if has_gpus else ''}; logs in {logs}", highlight=False)
        if not checkpoints:
            display.console.print("no --checkpoints (or RQL_CHECKPOINTS) folder shared by the nodes: a train task "
                                  "retried on another node starts over from step 0", highlight=False)
        spec = {"commit": commit, "git_url": git_url, "clones": clones, "checkpoints": checkpoints}
        scheduler = Scheduler(dag, spec, resources, params.cluster.retries, logs, display)
        started = time.perf_counter()
        try:
            states = scheduler.run()
        finally:
            display.close()
        makespan = time.perf_counter() - started
        attempts = scheduler.attempts()
    finally:
        ray.shutdown()

    done = [name for name in dag.order if states[name].status in ("ran", "restored")]
    failed = [name for name in dag.order if states[name].status == "failed"]
    restored, output, restore_times = (False, "", {})
    if done:
        restored, output, restore_times = restore(workspace, done, scheduler.accepted, logs / "_restore.log")
    restore_seconds = restore_times.get("total", 0.0)
    mismatched = lock_mismatches(workspace, scheduler.accepted) if restored else []
    write_summary(logs / "summary.json", states, attempts, {
        "commit": commit, "makespan_s": round(makespan, 3), "restore_s": round(restore_seconds, 3),
        "restore_phases_s": {k: round(v, 3) for k, v in restore_times.items()}, "restore_ok": restored,
        "lock_mismatches": mismatched})
    ran = sum(states[name].status == "ran" for name in done)
    print(f"{len(done)} of {len(dag.order)} stages done ({ran} ran, {len(done) - ran} restored from the run-cache) "
          f"in {makespan:.1f} s; workspace restored in {restore_seconds:.1f} s", file=sys.stderr)
    code = 0
    if done and not restored:
        print(f"error: restoring the accepted runs in the workspace failed, or dvc status finds them changed; "
              f"see {logs / '_restore.log'}:\n{output[-2000:]}", file=sys.stderr)
        code = 1
    if mismatched:
        print(f"error: dvc.lock differs from the accepted runs of {', '.join(mismatched)} (DVC's serialisation of "
              "the restored stages is not what the workers wrote?)", file=sys.stderr)
        code = 1
    for name in failed:
        print(f"error: stage {name} failed: {states[name].error}; log: {states[name].log}", file=sys.stderr)
    skipped = [name for name in dag.order if states[name].status == "skipped"]
    if skipped:
        print(f"not run (upstream failed): {', '.join(skipped)}", file=sys.stderr)
    return 1 if failed or skipped else code


if __name__ == "__main__":
    sys.exit(main())
