"""The pipeline on a simulated Ray cluster through ``python -m stages.cluster_repro``, against a real S3 server.

A ``ray.cluster_utils.Cluster`` on 127.0.0.1 only (a head without CPUs and two worker nodes, each with a clone pool
of its own: the nodes share no clone with each other or with the workspace) and moto's standalone S3 server on
127.0.0.1 as the DVC remote; a test checks that every socket the cluster listens on is bound to 127.0.0.1. The tiny
study (tests/test_pipeline.py's TINY settings, cached RQL: validate, download, prior, reverse, train, evaluate,
report) runs through the entry point while the node of the train task is lost after the first checkpoint (the
checkpoints in a folder both nodes reach): the task must resume on the other node, and the workspace must then hold
what a serial ``dvc repro`` of the same params writes. Toy DAGs of trivial stages check that a failing stage stops
only its descendants, that a rerun (also after the coordinator was killed) reruns nothing that finished, the local
mode (no ``--address``) against ``dvc repro``, and that a killed local coordinator leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline import DATASET, NUMBER, copy_project, dvc, git, run, write_tiny_params
from test_pipeline import stage as stage_name

from benchmarks.cluster_protocol import make_toy_repo, random_dag, s3_server, simulated_cluster

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)
NONDETERMINISTIC = ("summary.json", "live/metrics.json", "live/plots", "seed0.json", "reports/")  # wall times


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    with s3_server() as remote:
        yield remote


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    with simulated_cluster(tmp_path_factory.mktemp("nodes"), nodes=2, cpus_per_node=1) as simulated:
        yield simulated


def entry_point(repo: Path, address: str, *extra: str, wait: bool = True):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               JAX_PLATFORMS="cpu", MUJOCO_GL="egl")
    args = [sys.executable, "-m", "stages.cluster_repro", "--no-live", "--address", address, *extra]
    process = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    out, err = process.communicate()
    summary_path = repo / ".dvc" / "tmp" / "cluster-logs" / "summary.json"
    return process.returncode, out + err, json.loads(summary_path.read_text())


def remote_runs(s3: dict, prefix: str) -> dict[str, list[str]]:
    """Run-cache entries on the remote: stage key -> entry names."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpointurl"])
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="rql",
                                                                                     Prefix=f"{prefix}/runs/")
            for item in page.get("Contents", [])]
    runs: dict[str, list[str]] = {}
    for key in keys:
        *_, stage_key, entry = key.split("/")
        runs.setdefault(stage_key, []).append(entry)
    return runs


def use_s3(repo: Path, s3: dict, prefix: str) -> None:
    dvc("remote", "add", "-f", "-d", "shared", f"s3://rql/{prefix}", cwd=repo)
    dvc("remote", "modify", "shared", "endpointurl", s3["endpointurl"], cwd=repo)


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith("_s")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def comparable_lock(repo: Path) -> dict:
    """dvc.lock with the hashes of files holding wall times blanked (paths, order, cmds, params and the rest kept)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for entry in lock["stages"].values():
        for item in entry.get("deps", []) + entry.get("outs", []):
            if any(marker in item["path"] for marker in NONDETERMINISTIC) or item["path"] in ("data/runs",
                                                                                              "data/evals"):
                for field in ("md5", "size", "nfiles", "hash"):
                    item.pop(field, None)
    return lock


def train_stage_pids(among: set[int]) -> list[int]:
    """The processes of ``among`` running ``python -m stages.train`` (not the launcher or dvc above them)."""
    found = []
    for pid in sorted(among):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if "stages.train" in argv and "-m" in argv:
                found.append(pid)
    return found


def kill_the_node_after_the_first_checkpoint(cluster, checkpoints: Path, stop: threading.Event,
                                             killed: list) -> None:
    """As soon as the train stage's first checkpoint is complete (its files manifest written) in the shared folder:
    stop the stage (so it cannot finish first), SIGKILL every process of the simulated node it runs on (raylet,
    Ray workers, dvc, the stage) and remove the node, as when a machine dies. Ray must retry the task elsewhere.
    Only this test's own processes (the simulated cluster's) are looked at; a failure is recorded, not raised."""
    stopped: list[int] = []
    try:
        while not stop.is_set() and not killed:
            # <agent>/<dataset>/task<k>/seed<s>/<fingerprint>/<step>/files.json (stages.layout.checkpoint_root)
            complete = sorted(int(p.parent.name) for p in checkpoints.glob("*/*/*/*/*/*/files.json")
                              if p.parent.name.isdigit())
            raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.worker_nodes}
            under = {raylet: descendants(raylet) for raylet in raylets}
            for raylet, pids in under.items():
                stages = train_stage_pids(pids)
                if complete and stages:
                    for pid in stages:
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                    for pid in pids | {raylet}:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    cluster.remove_node(raylets[raylet], allow_graceful=False)
                    killed.append({"checkpoints": complete, "processes": len(pids) + 1,
                                   "node": raylets[raylet].node_id})
                    break
            time.sleep(0.05)
    except Exception as error:  # noqa: BLE001 - the test fails on it instead of waiting for a kill
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        killed.append({"error": f"{type(error).__name__}: {error}"})


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses of the TCP sockets in LISTEN state that the processes ``pids`` hold (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address = bytes.fromhex(fields[1].split(":")[0])
                if len(address) == 4:
                    found.add(".".join(str(b) for b in address[::-1]))
                else:  # IPv6 in four little-endian words; IPv4-mapped ::ffff:a.b.c.d as a.b.c.d
                    words = b"".join(address[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(".".join(str(b) for b in words[12:]) if words[:12] == b"\0" * 10 + b"\xff" * 2
                              else words.hex())
    return found


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (the simulated cluster's processes are this test process's)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(pid))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_the_simulated_cluster_listens_on_loopback_only(cluster):
    """Every socket the head and the nodes listen on is bound to 127.0.0.1, and so is every node's address."""
    import ray

    pids = descendants(os.getpid())
    assert len(pids) >= 6  # a GCS and three raylets at least
    addresses = listening_addresses(pids)
    assert addresses == {"127.0.0.1"}, addresses
    assert cluster.address.startswith("127.0.0.1:")
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
    finally:
        ray.shutdown()
    assert nodes == ["127.0.0.1"] * 3


def test_the_tiny_study_on_a_simulated_cluster_matches_a_serial_repro(cluster, s3, tmp_path):
    """The tiny study through the entry point, a node lost in the middle of training: the train task is retried on
    the other node, resumes from the shared checkpoint, and the workspace ends as a serial dvc repro leaves it."""
    workspace, serial, shared = tmp_path / "workspace", tmp_path / "serial", tmp_path / "shared-checkpoints"
    for repo in (workspace, serial):
        repo.mkdir()
        copy_project(repo)
        write_tiny_params(repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["agents"] = {"rql": [], "rql_cached": ["rql_cached"], "fql": [], "bc_flow": []}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "init", "-q"], repo)
    use_s3(workspace, s3, "study")
    for repo in (workspace, serial):
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "tiny study")
    dvc("repro", cwd=serial)

    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=kill_the_node_after_the_first_checkpoint,
                               args=(cluster, shared, stop, killed), daemon=True)
    watcher.start()
    try:
        code, log, summary = entry_point(workspace, cluster.address, "--checkpoints", str(shared))
    finally:
        stop.set()
        watcher.join()
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",  # the fixture's two nodes for the next tests
                         env_vars={"RQL_CLUSTER_CLONES": str(tmp_path / "replacement-node")})
    assert code == 0, log[-5000:]
    stages = summary["stages"]
    train = stage_name("train", "rql_cached")
    assert killed and killed[0]["checkpoints"] == [100], killed  # a node died after the checkpoint of step 100 ...
    assert stages[train]["attempts"] == 2 and stages[train]["status"] == "ran", stages[train]  # ... retried ...
    first, second = stages[train]["attempt_nodes"]
    assert first.split()[1] == killed[0]["node"][:8] and second.split()[1] != first.split()[1]  # ... elsewhere ...
    assert "resuming from the checkpoint at step 100" in Path(stages[train]["log"]).read_text()  # ... resumed
    run_dir = Path("data") / "runs" / "rql_cached" / DATASET / f"task{NUMBER}" / "seed0"
    run_summary = run_dir / "summary.json"
    assert json.loads((workspace / run_summary).read_text())["resumed_from"] == 100
    assert json.loads((serial / run_summary).read_text())["resumed_from"] == 0
    assert {s["status"] for s in stages.values()} == {"ran"} and len(stages) == 7
    assert all(s["node"].startswith("127.0.0.1 ") for s in stages.values())  # loopback only
    assert len({s["node"] for s in stages.values()}) >= 2  # several nodes took tasks
    assert summary["restore_ok"] and summary["lock_mismatches"] == []
    assert "Running stage" not in (workspace / ".dvc/tmp/cluster-logs/_restore.log").read_text()
    for name, stage in stages.items():  # one log per stage on the coordinator, holding that stage's run
        assert f"Running stage '{name}'" in Path(stage["log"]).read_text()

    # the resumed run's learning curves are those of the uninterrupted serial run (wall-clock series aside)
    curves = run_dir / "live" / "plots" / "metrics"
    series = sorted(p.relative_to(serial / curves) for p in (serial / curves).rglob("*.tsv")
                    if "steps_per_second" not in p.name)
    assert len(series) >= 5
    for name in series:
        assert (workspace / curves / name).read_text() == (serial / curves / name).read_text(), name

    # the same bytes as the serial run, in the user's workspace
    data = Path("data")
    deterministic = [*sorted((serial / data / "datasets" / DATASET).iterdir()),
                     *sorted((serial / data / "priors" / DATASET).iterdir()),
                     *sorted((serial / data / "reversed" / DATASET).iterdir()),
                     serial / run_dir / "policy.msgpack", serial / data / "params.json"]
    assert len(deterministic) >= 10
    for path in deterministic:
        assert (workspace / path.relative_to(serial)).read_bytes() == path.read_bytes(), path
    evaluation = data / "evals" / "rql_cached" / DATASET / f"task{NUMBER}" / "seed0.json"
    assert without_timings(json.loads((workspace / evaluation).read_text())) == without_timings(
        json.loads((serial / evaluation).read_text()))
    assert (workspace / "reports" / "index.html").stat().st_size > 1000
    assert comparable_lock(workspace) == comparable_lock(serial)
    assert json.loads(dvc("status", "--json", cwd=workspace).stdout) == {}
    # no stage ran twice: one run-cache entry per stage on the remote
    runs = remote_runs(s3, "study")
    assert len(runs) == 7 and all(len(entries) == 1 for entries in runs.values()), runs



FAILING = '''import sys
from pathlib import Path
if Path("fail.flag").exists():
    sys.exit("this stage fails on purpose")
Path("out").mkdir(exist_ok=True)
Path("out/bad.txt").write_text(Path("out/s000.txt").read_text() + "bad\\n")
'''


def test_a_failing_stage_stops_only_its_descendants_and_a_rerun_redoes_only_them(cluster, s3, tmp_path):
    repo = tmp_path / "toy"
    dag = {"s000": ([], 0.0), "s001": (["s000"], 0.0), "s002": (["s001"], 0.0)}
    make_toy_repo(repo, dag, {"url": "s3://rql/failing", "endpointurl": s3["endpointurl"]})
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages["stages"]["bad"] = {"cmd": "python failing.py", "deps": ["failing.py", "out/s000.txt"],
                               "outs": ["out/bad.txt"]}
    stages["stages"]["after_bad"] = {"cmd": "python step.py after_bad 0 out/bad.txt", "deps": ["out/bad.txt"],
                                     "outs": ["out/after_bad.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    (repo / "failing.py").write_text(FAILING)
    (repo / "fail.flag").write_text("")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a failing stage")

    code, log, summary = entry_point(repo, cluster.address)
    states = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert code == 1
    assert states == {"s000": "ran", "s001": "ran", "s002": "ran", "bad": "failed", "after_bad": "skipped"}
    bad_log = summary["stages"]["bad"]["log"]
    assert "error: stage bad failed" in log and bad_log in log
    assert "this stage fails on purpose" in Path(bad_log).read_text()
    assert (repo / "out" / "s002.txt").is_file() and not (repo / "out" / "bad.txt").exists()  # the rest restored
    assert summary["restore_ok"]

    (repo / "fail.flag").unlink()
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "fixed")
    code, log, summary = entry_point(repo, cluster.address)
    assert code == 0, log[-3000:]
    states = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert states == {"s000": "restored", "s001": "restored", "s002": "restored", "bad": "ran", "after_bad": "ran"}
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


def test_a_rerun_after_the_coordinator_was_killed_reruns_nothing_that_finished(cluster, s3, tmp_path):
    repo = tmp_path / "toy"
    dag = random_dag(8, seed=1, width=3, sleep=(0.5, 1.5))
    make_toy_repo(repo, dag, {"url": "s3://rql/killed", "endpointurl": s3["endpointurl"]})
    process = entry_point(repo, cluster.address, wait=False)
    deadline = time.time() + 300
    while len(remote_runs(s3, "killed")) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = len(remote_runs(s3, "killed"))
    assert 3 <= finished < len(dag)
    time.sleep(2)  # tasks of the dead driver end; a stage caught mid-push has no run-cache entry yet
    finished = remote_runs(s3, "killed")

    code, log, summary = entry_point(repo, cluster.address)
    assert code == 0, log[-3000:]
    restored = sum(stage["status"] == "restored" for stage in summary["stages"].values())
    ran = sum(stage["status"] == "ran" for stage in summary["stages"].values())
    assert restored >= len(finished) and restored + ran == len(dag)
    runs = remote_runs(s3, "killed")
    assert len(runs) == len(dag) and all(len(entries) == 1 for entries in runs.values()), runs
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


def test_without_an_address_it_is_a_parallel_dvc_repro_on_a_local_ray_instance(tmp_path):
    """The default: a local Ray instance, clones under .dvc/tmp; the same outputs and dvc.lock as dvc repro."""
    dag = {"s000": ([], 0.0), "s001": (["s000"], 0.0), "s002": (["s000"], 0.0), "s003": (["s001", "s002"], 0.0)}
    for name in ("cluster", "serial"):
        make_toy_repo(tmp_path / name, dag, {"url": str(tmp_path / f"{name}-remote")})
    dvc("repro", cwd=tmp_path / "serial")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([sys.executable, "-m", "stages.cluster_repro", "--no-live", "--num-cpus", "2"],
                            cwd=tmp_path / "cluster", env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 4 stages done (4 ran" in result.stderr
    summary = json.loads((tmp_path / "cluster" / ".dvc/tmp/cluster-logs/summary.json").read_text())
    assert all(stage["node"].startswith("127.0.0.1 ") for stage in summary["stages"].values()), summary  # loopback
    for name in dag:
        output = Path("out", f"{name}.txt")
        assert (tmp_path / "cluster" / output).read_bytes() == (tmp_path / "serial" / output).read_bytes()
    assert (tmp_path / "cluster" / "dvc.lock").read_bytes() == (tmp_path / "serial" / "dvc.lock").read_bytes()
    assert sorted(p.name for p in (tmp_path / "cluster" / ".dvc" / "tmp" / "cluster-clones").glob("clone-*.lock"))
    assert json.loads(dvc("status", "--json", cwd=tmp_path / "cluster").stdout) == {}


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) of every process."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            table[int(pid)] = (int(fields[1]), fields[19], fields[0])
    return table


def test_a_killed_local_coordinator_leaves_no_process_behind(tmp_path):
    """SIGKILL of the entry point (local Ray instance) while a stage runs: its Ray instance, the task's dvc and stage
    and Ray's agents (which otherwise lingered a minute and more) all end with it."""
    repo = tmp_path / "toy"
    make_toy_repo(repo, {"s000": ([], 120.0)}, {"url": str(tmp_path / "remote")})
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen([sys.executable, "-m", "stages.cluster_repro", "--no-live", "--num-cpus", "1"],
                               cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline, tree = time.time() + 300, {}
        while time.time() < deadline and process.poll() is None:
            table = process_table()
            tree = {pid: table[pid][1] for pid in descendants(process.pid) if pid in table}
            commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in tree
                        if Path(f"/proc/{pid}/cmdline").exists()}
            if any(b"step.py\0s000" in command for command in commands.values()):  # the stage itself runs
                break
            time.sleep(0.2)
        assert process.poll() is None and tree, "the stage never started"
        reaper = [pid for pid, command in commands.items() if b"reaper.py" in command]
        assert len(reaper) == 1 and any(b"ray::" in command for command in commands.values())
        process.send_signal(signal.SIGKILL)
        process.wait()
        while time.time() < deadline and reaper[0] in process_table():  # the watcher kills, then exits
            time.sleep(0.2)
        table = process_table()
        alive = [pid for pid, started in tree.items() if pid in table and table[pid][1] == started
                 and table[pid][2] != "Z"]
        assert alive == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
