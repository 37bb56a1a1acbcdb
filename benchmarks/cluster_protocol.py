"""Cost of the cluster protocol (python -m stages.cluster_repro) and makespan of a synthetic DAG on Ray.

    python benchmarks/cluster_protocol.py overhead --stages 10 100   # per-stage reset/pull/push, final restore
    python benchmarks/cluster_protocol.py makespan --stages 200 --nodes 4 --slots 1
    python benchmarks/cluster_protocol.py large --stages 10 100 200 1000 --s3   # the final restore before/after
                                                                                 # and the worker step, at sizes too
                                                                                 # large for the simulated cluster

``overhead`` and ``makespan`` build a toy DVC repository of trivial stages (``python step.py``: sleep, then write a
file derived from the deps), a DVC remote (a local folder, or ``--s3`` for moto's S3 server on 127.0.0.1) and a
simulated Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs and ``--nodes`` worker nodes, each with its
own clone pool), run the entry point against it and read the coordinator's ``summary.json``. ``makespan`` compares
the measured makespan with the ideal: max(critical path, total work / slots). ``large`` builds the study serially
(each stage's command, then one ``dvc commit --force``: the same dvc.lock and run-cache entries as ``dvc repro``,
which itself rewrites dvc.lock after every stage and is too slow at 1,000 stages here), pushes it, and times in fresh
clones the coordinator's final restore as it was (``dvc repro --pull``, stopped after ``--before-timeout``) and as
it is (``cluster_repro.restore``: one pass, then ``dvc status``), both checked byte for byte against the build, then
the worker step of the last ``--sample`` stages. Prints Markdown tables; times only, nothing asserted on them (the
machine is shared). The figures measured are in the README ("Running the study on several machines").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import chdir, contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STEP = '''import hashlib, sys, time
from pathlib import Path
name, seconds, deps = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
time.sleep(seconds)
digest = hashlib.sha256(name.encode())
for dep in deps:
    digest.update(Path(dep).read_bytes())
Path("out").mkdir(exist_ok=True)
Path("out", name + ".txt").write_text(digest.hexdigest() + "\\n")
'''


def random_dag(count: int, seed: int = 0, width: int = 8, max_deps: int = 2, sleep: tuple = (0.0, 0.0)) -> dict:
    """name -> (deps, seconds): each stage depends on up to max_deps of the ``width`` stages before it."""
    rng = random.Random(seed)
    dag = {}
    for index in range(count):
        earlier = [f"s{j:03d}" for j in range(max(0, index - width), index)]
        deps = sorted(rng.sample(earlier, min(len(earlier), rng.randint(0 if index < width else 1, max_deps))))
        dag[f"s{index:03d}"] = (deps, round(rng.uniform(*sleep), 2))
    return dag


def ideal_makespan(dag: dict, slots: int) -> tuple[float, float]:
    """(critical path, total work / slots) of stage durations alone."""
    finish = {}
    for name, (deps, seconds) in dag.items():
        finish[name] = max((finish[d] for d in deps), default=0.0) + seconds
    return max(finish.values()), sum(seconds for _, seconds in dag.values()) / slots


def make_toy_repo(repo: Path, dag: dict, remote_config: dict[str, str]) -> None:
    """A git + DVC repository of ``dag``'s stages, committed, with the project's params.yaml (cluster section)."""
    repo.mkdir(parents=True)
    (repo / "step.py").write_text(STEP)
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    stages = {name: {"cmd": f"python step.py {name} {seconds} " + " ".join(f"out/{d}.txt" for d in deps),
                     "deps": ["step.py", *(f"out/{d}.txt" for d in deps)], "outs": [f"out/{name}.txt"]}
              for name, (deps, seconds) in dag.items()}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                    [sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", remote_config["url"]],
                    *([sys.executable, "-m", "dvc", "remote", "modify", "shared", key, value]
                      for key, value in remote_config.items() if key != "url"),
                    ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", "toy"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def s3_server(bucket: str = "rql"):
    """moto's standalone S3 server on 127.0.0.1 with one bucket; yields the DVC remote config. Env: credentials."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1,localhost")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=bucket)
        yield {"url": f"s3://{bucket}/dvc", "endpointurl": f"http://127.0.0.1:{port}"}
    finally:
        server.stop()


@contextmanager
def simulated_cluster(base: Path, nodes: int, cpus_per_node: int):
    """A head without CPUs (the coordinator's) and ``nodes`` worker nodes, each with a clone pool of its own, all
    on 127.0.0.1 only (``stages.cluster.loopback``: this process must not have imported ray before)."""
    from stages.cluster.loopback import LOOPBACK, use_loopback

    use_loopback()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": LOOPBACK})
    try:
        for index in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address=LOOPBACK,
                             env_vars={"RQL_CLUSTER_CLONES": str(base / f"node{index}")})
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_entry_point(repo: Path, address: str | None, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    args = [sys.executable, "-m", "stages.cluster_repro", "--no-live", *(["--address", address] if address else []),
            *extra]
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    summary_path = repo / ".dvc" / "tmp" / "cluster-logs" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return result, summary


PHASES = ("reset", "pull", "restore", "repro", "push", "push_run_cache")


def overhead(counts: list[int], use_s3: bool, nodes: int) -> None:
    """Trivial stages (no sleep) through the entry point: each task's phases, median over tasks, and the median task
    time over the first and the last tenth of the tasks (a per-task cost that grows with the study shows there)."""
    print("| stages | reset s | upstream pull s | own run-cache fetch s | repro -s s | push s | push --run-cache s "
          "| task s (first / last tenth) | makespan s | final restore s |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
            base = Path(tmp)
            os.environ.setdefault("RAY_TMPDIR", str(base / "ray"))
            with (s3_server() if use_s3 else _local_remote(base)) as remote:
                dag = random_dag(count, seed=0, sleep=(0.0, 0.0))  # trivial stages, up to 8 at once
                make_toy_repo(base / "repo", dag, remote)
                with simulated_cluster(base, nodes, 1) as cluster:
                    result, summary = run_entry_point(base / "repo", cluster.address)
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            stages = [summary["stages"][name] for name in dag]  # in DAG order
            med = {k: statistics.median(s["times"].get(k, 0.0) for s in stages) for k in PHASES}
            tenth = max(1, len(stages) // 10)
            first = statistics.median(s["seconds"] for s in stages[:tenth])
            last = statistics.median(s["seconds"] for s in stages[-tenth:])
            print(f"| {count} | {med['reset']:.2f} | {med['pull']:.2f} | {med['restore']:.2f} | {med['repro']:.2f} | "
                  f"{med['push']:.2f} | {med['push_run_cache']:.2f} | {first:.2f} / {last:.2f} | "
                  f"{summary['makespan_s']:.0f} | {summary['restore_s']:.1f} |", flush=True)


def build_serially(repo: Path, dag: dict, env: dict[str, str]) -> float:
    """What a serial ``dvc repro`` + ``dvc push`` + ``dvc push --run-cache`` of the toy study leaves, built faster:
    each stage's command run in order, then one ``dvc commit --force`` (which saves every run-cache entry and
    writes dvc.lock once: byte-identical to ``dvc repro``'s, measured at 100 stages, where ``dvc repro`` itself
    rewrites dvc.lock after every stage, which made 1,000 stages too slow to build here). Seconds."""
    clock = time.perf_counter()
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name in dag:  # random_dag's order is topological
        subprocess.run(stages[name]["cmd"].split(), cwd=repo, env=env, check=True)
    for command in (["commit", "--force", "--quiet"], ["push"], ["push", "--run-cache"]):
        subprocess.run([sys.executable, "-m", "dvc", *command], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - clock


def workspace_bytes(repo: Path) -> dict[str, bytes]:
    """dvc.lock, the outputs and DVC's .gitignore files of a toy study's workspace."""
    return {p.relative_to(repo).as_posix(): p.read_bytes()
            for p in [repo / "dvc.lock", *sorted((repo / "out").iterdir())] if p.is_file()}


def old_restore(workspace: Path, env: dict[str, str], timeout: float) -> tuple[float, int, bool]:
    """The coordinator's final restore before issue 11's fix, ``dvc repro --pull`` in the workspace: (seconds,
    stages restored, finished within ``timeout``); none may run."""
    clock = time.perf_counter()
    log = workspace.parent / f"{workspace.name}-repro-pull.log"
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--pull"], cwd=workspace, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
        try:
            code, finished = process.wait(timeout=timeout), True
        except subprocess.TimeoutExpired:
            process.kill()
            code, finished = process.wait(), False
    seconds, text = time.perf_counter() - clock, log.read_text()
    if "Running stage" in text or (finished and code != 0):
        raise SystemExit(f"dvc repro --pull failed or ran stages:\n{text[-2000:]}")
    return seconds, text.count("is cached - skipping run"), finished


def large(count: int, use_s3: bool, sample: int, before_timeout: float) -> None:
    """A study too large to run through the simulated cluster here: ``count`` trivial stages built serially and
    pushed (data and run-cache), then (1) the coordinator's final restore in a fresh clone, before the fix (``dvc
    repro --pull``, stopped after ``before_timeout`` s; 0: not run) and after it (``cluster_repro.restore``: one
    pass, then ``dvc status``), each checked byte for byte against the built study, and (2) the worker step itself
    (``worker.run_stage``, no Ray) for the last ``sample`` stages, their run-cache entries removed from the remote
    first so that they really run: the protocol's cost per stage at that size."""
    from dvc.repo import Repo
    from dvc.stage.cache import _get_stage_hash

    from stages.cluster.restore import load_lock
    from stages.cluster.worker import run_stage
    from stages.cluster_repro import restore

    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        base = Path(tmp)
        with (s3_server() if use_s3 else _local_remote(base)) as remote:
            # after s3_server(), which puts the S3 credentials into this process's environment
            env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            dag = random_dag(count, seed=0, sleep=(0.0, 0.0))
            make_toy_repo(base / "repo", dag, remote)
            serial = build_serially(base / "repo", dag, env)
            expected = workspace_bytes(base / "repo")
            accepted = load_lock(base / "repo" / "dvc.lock")

            before = "not run"
            if before_timeout > 0:
                subprocess.run(["git", "clone", "-q", str(base / "repo"), str(base / "before")], check=True)
                seconds, restored, finished = old_restore(base / "before", env, before_timeout)
                if finished:
                    if workspace_bytes(base / "before") != expected:
                        raise SystemExit("dvc repro --pull left another workspace than the serial build")
                    before = f"{seconds:.1f} s"
                else:
                    before = f"> {seconds:.0f} s (stopped: {restored} of {count} stages restored by then)"
            subprocess.run(["git", "clone", "-q", str(base / "repo"), str(base / "after")], check=True)
            with chdir(base / "after"):  # as the coordinator runs it, from the workspace's root
                clean, output, times = restore(base / "after", list(dag), accepted, base / "after-restore.log")
            if not clean or workspace_bytes(base / "after") != expected:
                raise SystemExit(f"the one-pass restore failed or left another workspace:\n{output[-2000:]}")
            after = f"{times['total']:.1f} s (" + ", ".join(f"{k} {times[k]:.1f}" for k in
                                                          ("index", "fetch", "checkout", "lock", "status")) + ")"

            names = list(dag)[-sample:]
            with chdir(base / "repo"), Repo(str(base / "repo")) as repo:  # their run-cache entries off the remote
                odb = repo.cloud.get_remote_odb(None, "bench", hash_name="md5-dos2unix")
                for name in names:
                    (stage,) = repo.stage.collect(name)
                    key = _get_stage_hash(stage)
                    odb.fs.rm(odb.fs.join(odb.path, "runs", key[:2], key), recursive=True)
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=base / "repo", capture_output=True, text=True,
                                    check=True).stdout.strip()
            results = []
            for name in names:
                spec = {"stage": name, "commit": commit, "git_url": str(base / "repo"), "clones": str(base / "clones"),
                        "upstream": {up: accepted[up] for up in dag[name][0]}, "checkpoints": None}
                clock = time.perf_counter()
                result = run_stage(spec)
                if result["status"] != "ran":
                    raise SystemExit(f"{name}: {result['status']} {result.get('error')}\n{result['log'][-2000:]}")
                results.append((time.perf_counter() - clock, result["times"]))
    med = {k: statistics.median(t.get(k, 0.0) for _, t in results) for k in PHASES}
    print(f"| {count} | {serial:.0f} | {before} | {after} | "
          + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
          + f", whole {statistics.median(t for t, _ in results[1:] or results):.2f} |", flush=True)


@contextmanager
def _local_remote(base: Path):
    yield {"url": str(base / "remote")}


def makespan(counts: list[int], nodes: int, slots_per_node: int, seed: int, use_s3: bool) -> None:
    """A random DAG of stages sleeping 1-4 s on ``nodes`` x ``slots_per_node`` slots: the measured makespan against
    the ideal of the sleeps alone and against the ideal with each stage lengthened by the measured median protocol
    overhead of a task (the issue's target: within 10% of the latter)."""
    print("| stages | nodes x slots | total work s | critical path s | ideal s | median overhead per task s "
          "| ideal with overhead s | measured makespan s | measured / ideal with overhead | final restore s |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for count in counts:
        dag = random_dag(count, seed=seed, sleep=(1.0, 4.0))
        slots = nodes * slots_per_node
        critical, per_slot = ideal_makespan(dag, slots)
        with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
            base = Path(tmp)
            os.environ.setdefault("RAY_TMPDIR", str(base / "ray"))
            with (s3_server() if use_s3 else _local_remote(base)) as remote:
                make_toy_repo(base / "repo", dag, remote)
                with simulated_cluster(base, nodes, slots_per_node) as cluster:
                    result, summary = run_entry_point(base / "repo", cluster.address)
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
        overhead = statistics.median(s["seconds"] - dag[name][1] for name, s in summary["stages"].items())
        padded = {name: (deps, seconds + overhead) for name, (deps, seconds) in dag.items()}
        with_overhead = max(ideal_makespan(padded, slots))
        total = sum(seconds for _, seconds in dag.values())
        print(f"| {count} | {nodes} x {slots_per_node} | {total:.0f} | {critical:.0f} | {max(critical, per_slot):.0f} | "
              f"{overhead:.2f} | {with_overhead:.0f} | {summary['makespan_s']:.0f} | "
              f"{summary['makespan_s'] / with_overhead:.2f} | {summary['restore_s']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("overhead", "makespan", "large"))
    parser.add_argument("--stages", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--slots", type=int, default=1, help="tasks at once per node (its CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--s3", action="store_true", help="moto's S3 server on 127.0.0.1 as the remote")
    parser.add_argument("--sample", type=int, default=5, help="large: worker steps timed (the first one, which makes "
                        "the git clone, is left out of the median of the whole step)")
    parser.add_argument("--before-timeout", type=float, default=1800.0,
                        help="large: stop the old restore (dvc repro --pull) after this many seconds; 0: skip it")
    args = parser.parse_args()
    if args.what == "overhead":
        overhead(args.stages, args.s3, args.nodes)
    elif args.what == "large":
        print("| stages | serial build + push s | final restore before (dvc repro --pull) | final restore after "
              "(one pass + dvc status), phases s | worker step of the last stages, median s |\n"
              "| --- | --- | --- | --- | --- |", flush=True)
        for count in args.stages:
            large(count, args.s3, args.sample, args.before_timeout)
    else:
        makespan(args.stages, args.nodes, args.slots, args.seed, args.s3)


if __name__ == "__main__":
    main()
