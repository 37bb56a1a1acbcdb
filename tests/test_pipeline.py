"""The whole DVC pipeline on tiny data, in a temporary copy of this repository.

One module-scoped build runs `dvc repro` (download -> prior -> reverse -> train x 5 agents -> evaluate -> report);
the tests then check its outputs, that nothing reruns, which stages a param change invalidates, that adding a task
number or a dataset to the finished study leaves every stage of the others alone, that a teammate gets the cached
artifacts through the DVC remote instead of recomputing them, and that training resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.agent_registry import AGENTS as REGISTRY

ROOT = Path(__file__).resolve().parent.parent
DATASET, NUMBER = "cube-single-play-v0", 2
TASK = "cube-single-play-singletask-task2-v0"  # OGBench's name of task NUMBER of DATASET
AGENTS = ["rql", "rql_cached", "rql_refresh", "fql", "bc_flow"]

TINY = {
    "data": {"episodes": 3, "val_episodes": 1, "episode_steps": 201},
    "networks": {"actor": [32, 32], "critic": [32, 32], "ensemble": 2},
    "prior": {"steps": 100},
    "reverse": {"batch_size": 256, "shard_rows": 250},
    "train": {"steps": 200, "updates_per_call": 50, "log_every": 50, "checkpoint_every": 100, "refresh_every": 100,
              "eval_every": 100, "eval_episodes": 2},
    "evaluate": {"episodes": 2, "envs": 2, "workers": 1},
}

pytestmark = pytest.mark.timeout(1800)


def environment(code: Path | None = None) -> dict[str, str]:
    """The environment stages run in; ``code``: the repository copy whose ``stages`` package they must import."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = f"{code}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MUJOCO_GL", "egl")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run(args: list[str], cwd: Path, check: bool = True, code: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=environment(code), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


def copy_project(target: Path) -> None:
    """The project's files as git sees them (tracked and untracked, not ignored), as a new git repo with DVC."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not name.startswith(("data/", "reports/")) and ".dvc/cache" not in name:
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    (target / "dvc.lock").unlink(missing_ok=True)
    for sub in ("data", "reports"):
        shutil.rmtree(target / sub, ignore_errors=True)


def write_tiny_params(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"], params["tasks"], params["seeds"] = [DATASET], [NUMBER], [0]
    params["agents"] = {"rql": ["rql"], "rql_cached": ["rql_cached", "rql_refresh"], "fql": ["fql"],
                        "bc_flow": ["bc_flow"]}
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def git(repo: Path, *args: str) -> None:
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], repo)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("pipeline")
    repo, remote = base / "repo", base / "remote"
    repo.mkdir()
    copy_project(repo)
    write_tiny_params(repo)
    run(["git", "init", "-q"], repo)
    dvc("remote", "modify", "local", "url", str(remote), cwd=repo)  # keeps the project's remote settings (verify)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny study")
    started = time.perf_counter()
    result = dvc("repro", cwd=repo)
    return {"repo": repo, "remote": remote, "log": result.stdout + result.stderr,
            "seconds": time.perf_counter() - started}


def stage(group: str, agent: str, dataset: str = DATASET, number: int = NUMBER, seed: int = 0) -> str:
    """The DVC name of a train or evaluate stage, e.g. train_rql@rql-cube-single-play-v0-2-0."""
    return f"{group}_{REGISTRY[agent].group}@{agent}-{dataset}-{number}-{seed}"


def run_stages(dataset: str, number: int) -> set[str]:
    """The train and evaluate stages of every agent on task ``number`` of ``dataset``, seed 0."""
    return {stage(group, agent, dataset, number) for group in ("train", "evaluate") for agent in AGENTS}


def test_every_stage_ran_and_wrote_its_outputs(built):
    repo, log = built["repo"], built["log"]
    for name in ("validate", f"download@{DATASET}", f"prior@{DATASET}", f"reverse@{DATASET}",
                 *run_stages(DATASET, NUMBER), "report"):
        assert f"Running stage '{name}'" in log, name
    data = repo / "data"
    assert (data / "datasets" / DATASET / "cube-single-play-v0.npz").is_file()
    assert json.loads((data / "datasets" / DATASET / "manifest.json").read_text())
    assert (data / "priors" / DATASET / "policy.msgpack").is_file()
    manifest = json.loads((data / "reversed" / DATASET / "manifest.json").read_text())
    assert manifest["total_rows"] == 3 * 200 and len(manifest["shards"]) == 3  # 250 rows per shard
    for agent in AGENTS:
        run_dir = data / "runs" / agent / DATASET / f"task{NUMBER}" / "seed0"
        assert (run_dir / "policy.msgpack").is_file()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 200 and summary["agent"] == agent
        live = json.loads((run_dir / "live" / "metrics.json").read_text())
        assert live["step"] == 200 and "train" in live
        record = json.loads((data / "evals" / agent / DATASET / f"task{NUMBER}" / "seed0.json").read_text())
        assert record["summary"]["episodes"] == 2 and 0.0 <= record["success"] <= 100.0 and record["task"] == TASK
        assert (data / "evals" / agent / DATASET / f"task{NUMBER}" / "seed0" / "rollout.gif").stat().st_size > 1000
    drift = json.loads((data / "runs" / "rql_refresh" / DATASET / f"task{NUMBER}" / "seed0" / "live" /
                        "metrics.json").read_text())
    assert "cache_drift_mean" in drift["train"] and "cache_stale_fraction" in drift["train"]


def test_the_report_is_self_contained_and_shows_every_agent(built):
    reports = built["repo"] / "reports"
    page = (reports / "index.html").read_text()
    for agent in AGENTS:
        assert f"<th>{agent}</th>" in page
    assert page.count("data:image/png;base64,") >= 4 and "data:image/gif;base64," in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch: works offline
    markdown = (reports / "index.md").read_text()
    for section in ("## Success rate", "## Learning curves", "## Training metrics", "## Flow reversal",
                    "## Run times", "## Rollouts", "## Params"):
        assert section in markdown
    for figure in ("success_by_agent.png", "learning_curves.png", "roundtrip_error.png", "cache_drift.png"):
        assert (reports / "figures" / figure).stat().st_size > 5000


def test_a_second_repro_runs_nothing(built):
    result = dvc("repro", cwd=built["repo"])
    assert "Running stage" not in result.stdout
    assert json.loads(dvc("status", "--json", cwd=built["repo"]).stdout) == {}


def test_rebuilding_the_cache_and_prior_gives_the_same_bytes(built):
    """Same inputs, same bytes: what DVC's cache and a teammate's pull rely on."""
    repo = built["repo"]
    before = {path: path.read_bytes() for path in sorted((repo / "data").glob(f"*/{DATASET}/*")) if path.is_file()
              and path.parent.parent.name in ("priors", "reversed")}
    assert len(before) >= 5  # policy.msgpack, prior.json, manifest.json, 3 shards
    dvc("repro", "--force", "--single-item", f"prior@{DATASET}", f"reverse@{DATASET}", cwd=repo)
    changed = [str(path) for path, data in before.items() if path.read_bytes() != data]
    assert changed == []
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("evaluate", "episodes", 3, {"evaluate_rql", "evaluate_rql_cached", "evaluate_fql", "evaluate_bc_flow",
                                     "report"}),
        ("fql", "alpha", 10.0, {"train_fql"}),
        ("agent", "alpha", 2.0, {"train_rql", "train_rql_cached"}),
        ("agent", "ema", 0.99, {"prior", "train_rql", "train_rql_cached", "train_bc_flow"}),
        ("reverse", "method", "euler", {"reverse", "train_rql_cached"}),
        ("train", "refresh_every", 50, {"train_rql_cached"}),
        ("prior", "steps", 150, {"prior"}),
        ("data", "sparse", True, {"train_rql", "train_rql_cached", "train_fql"}),  # BC, prior and cache: no reward
        ("data", "episodes", 4, {"download"}),
    ],
)
def test_a_param_change_invalidates_exactly_the_stages_that_read_it(built, section, key, value, expected):
    repo = built["repo"]
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(dvc("status", "--json", cwd=repo).stdout)
    finally:
        (repo / "params.yaml").write_text(original)
    assert {name.split("@")[0] for name in status} == expected | {"validate"}  # it checks every edit


@pytest.mark.parametrize("section, key", [("train", "stepz"), (None, "foo")])
def test_an_unknown_key_fails_repro_even_when_nothing_else_would_rerun(built, section, key):
    repo = built["repo"]
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    (params[section] if section else params)[key] = 1
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = dvc("repro", cwd=repo, check=False)
    finally:
        (repo / "params.yaml").write_text(original)
    name = f"{section}.{key}" if section else key
    assert result.returncode != 0
    assert f"{name}: unknown key" in result.stderr and "Running stage 'validate'" in result.stdout
    assert "Running stage 'download" not in result.stdout
    dvc("repro", "validate", cwd=repo)  # the original params: valid again, same output
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


@pytest.mark.parametrize(
    "change, new_stages",
    [
        # a task number: its train and evaluate stages, on the dataset, prior and cache already there
        ({"tasks": [NUMBER, 3]}, run_stages(DATASET, 3)),
        # a dataset: its download, prior and reverse, and the runs of every task number on it
        ({"datasets": [DATASET, "pointmaze-medium-navigate-v0"]},
         {f"{kind}@pointmaze-medium-navigate-v0" for kind in ("download", "prior", "reverse")}
         | run_stages("pointmaze-medium-navigate-v0", NUMBER)),
    ],
    ids=["task", "dataset"],
)
def test_adding_a_task_or_a_dataset_to_a_finished_study_reruns_nothing_else(built, change, new_stages):
    """Only the new stages and the aggregate ones (validate checks every edit; report reads every run) are out of
    date, so `dvc repro` reruns nothing else: no other dataset, prior, cache, run or evaluation."""
    repo = built["repo"]
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original) | change
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(dvc("status", "--json", cwd=repo).stdout)
    finally:
        (repo / "params.yaml").write_text(original)
    assert set(status) == new_stages | {"validate", "report"}
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


def test_a_teammate_pulls_the_shared_artifacts_instead_of_recomputing_them(built, tmp_path):
    repo = built["repo"]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "results")
    dvc("push", cwd=repo)
    # the README's line for a teammate, exactly as written (make setup installs the locked environment)
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "# a teammate" in x)
    command = line.split("  #")[0].replace("<repo>", str(repo))
    env = {k: v for k, v in environment().items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    shared = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False)
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
    clone = tmp_path / "rql"
    status = json.loads(dvc("status", "--json", cwd=clone).stdout)
    assert status == {}
    shard = clone / "data" / "reversed" / DATASET / "part-00000.parquet"
    assert shard.read_bytes() == (repo / "data" / "reversed" / DATASET / "part-00000.parquet").read_bytes()
    before = shard.stat().st_mtime_ns
    retrain = dvc("repro", "--force", "--single-item", stage("train", "rql_cached"), cwd=clone)
    log = retrain.stdout + retrain.stderr
    assert "read the reversal cache" in log and "Running stage 'reverse" not in log
    assert shard.stat().st_mtime_ns == before
    assert "Running stage" not in dvc("repro", "--dry", f"reverse@{DATASET}", cwd=clone).stdout


def test_an_interrupted_training_run_resumes_and_matches_an_uninterrupted_one(built, tmp_path):
    repo = built["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(steps=20000, updates_per_call=50, log_every=500, checkpoint_every=500, eval_every=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(repo / "data" / "datasets", tmp_path / "data" / "datasets")
    command = [sys.executable, "-m", "stages.train", "--agent", "bc_flow", "--dataset", DATASET, "--task",
               str(NUMBER), "--seed", "0", "--no-progress"]
    checkpoints = tmp_path / "data" / "checkpoints" / "bc_flow" / DATASET / f"task{NUMBER}" / "seed0"
    process = subprocess.Popen(command, cwd=tmp_path, env=environment(repo), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not any(checkpoints.glob("*/500")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before it could be interrupted"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    run_dir = tmp_path / "data" / "runs" / "bc_flow" / DATASET / f"task{NUMBER}" / "seed0"
    assert not (run_dir / "policy.msgpack").exists()
    resumed = run(command, tmp_path, code=repo)
    assert "resuming from the checkpoint at step" in resumed.stderr
    interrupted_policy = (run_dir / "policy.msgpack").read_bytes()
    shutil.rmtree(tmp_path / "data" / "checkpoints")
    run(command, tmp_path, code=repo)
    assert (run_dir / "policy.msgpack").read_bytes() == interrupted_policy
