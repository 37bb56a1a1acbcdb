"""The coordinator's final restore (``stages/cluster/restore.py``): the accepted runs restored in one pass must leave
the workspace as a serial ``dvc repro`` does, byte for byte (outputs, DVC's ``.gitignore`` files, ``dvc.lock``).

A toy pipeline with what the study's own pipeline has and trivial stages lack: params (in a file of their own, with
values that YAML 1.1 and 1.2 read differently: ``'yes'``, ``'1:20'``, ``1e6``, ``1.0e-05``), folder outputs, several
outputs per stage, a metrics file, and a stage depending on a folder that holds DVC's ``.gitignore`` of two other
stages' outputs (its hash counts that file, as the report's ``data/runs`` does). The accepted entries are a serial run's ``dvc.lock``
entries, read as DVC reads them; the restore runs in a fresh clone whose remote holds the serial run's data. The last
test runs the whole entry point (a local Ray instance) on the same pipeline against a serial ``dvc repro``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.cluster.restore import RestoreError, load_lock, lock_text, restore_accepted

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)

MAKE = '''import hashlib, sys
from pathlib import Path
name, deps = sys.argv[1], sys.argv[2:]
digest = hashlib.sha256(name.encode())
for dep in deps:
    for path in sorted(Path(dep).rglob("*")) if Path(dep).is_dir() else [Path(dep)]:
        if path.is_file():
            digest.update(path.as_posix().encode() + path.read_bytes())
value = digest.hexdigest()
if name == "a":
    Path("res/a").mkdir(parents=True)
    for part in ("x", "y"):
        Path("res/a", part + ".txt").write_text(value + part + "\\n")
    Path("out").mkdir(exist_ok=True)
    Path("out/a.txt").write_text(value + "\\n")
elif name == "b":
    Path("res/b/deep").mkdir(parents=True)
    Path("res/b/deep/z.txt").write_text(value + "\\n")
elif name == "c":
    Path("out").mkdir(exist_ok=True)
    Path("out/c.txt").write_text(value + "\\n")
    Path("m.json").write_text('{"score": %d}\\n' % int(value[:4], 16))
else:
    Path("out").mkdir(exist_ok=True)
    Path("out", name + ".txt").write_text(value + "\\n")
'''
PARAMS = "lr: 1.0e-05\nflag: 'yes'\nname: '1:20'\nbig: 1e6\nother: 3\n"
STAGES = {
    "a": {"cmd": "python make.py a toy.yaml", "deps": ["make.py"], "params": [{"toy.yaml": ["lr", "flag", "name", "big"]}],
          "outs": ["res/a", "out/a.txt"]},
    "d": {"cmd": "python make.py d", "deps": ["make.py"], "params": [{"toy.yaml": ["other"]}], "outs": ["out/d.txt"]},
    "b": {"cmd": "python make.py b res/a", "deps": ["make.py", "res/a"], "outs": ["res/b"]},
    "c": {"cmd": "python make.py c res out/d.txt", "deps": ["make.py", "res", "out/d.txt"], "outs": ["out/c.txt"],
          "metrics": [{"m.json": {"cache": True}}]},
}
ORDER = ["a", "d", "b", "c"]  # dvc repro's order of STAGES (checked in the first test)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], repo)


def git(repo: Path, *args: str) -> None:
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], repo)


def toy(repo: Path, remote: Path) -> None:
    repo.mkdir(parents=True)
    (repo / "make.py").write_text(MAKE)
    (repo / "toy.yaml").write_text(PARAMS)
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")  # the entry point reads its cluster section
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}, sort_keys=False))
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "toy")


def clone(source: Path, target: Path) -> Path:
    run(["git", "clone", "-q", str(source), str(target)], source.parent)
    return target


def workspace_files(repo: Path) -> dict[str, bytes]:
    """Every file of the workspace but git's and DVC's own folders (outputs, .gitignore files, dvc.lock, ...)."""
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and not p.relative_to(repo).as_posix().startswith((".git/", ".dvc/"))}


def status(repo: Path, *targets: str) -> dict:
    return json.loads(dvc(repo, "status", "--json", *targets).stdout)


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> Path:
    """The toy pipeline run serially by ``dvc repro``, its data pushed to its remote (``<base>/remote``)."""
    base = tmp_path_factory.mktemp("restore")
    toy(base / "serial", base / "remote")
    dvc(base / "serial", "repro")
    dvc(base / "serial", "push")
    return base / "serial"


def test_the_restore_leaves_a_fresh_clone_as_a_serial_repro_does(serial, tmp_path):
    from stages.cluster.dag import load_dag

    with contextlib.chdir(serial):  # stage names are relative to the working directory, as in the coordinator
        assert load_dag(serial, []).order == ORDER
    accepted = load_lock(serial / "dvc.lock")
    assert accepted["a"]["params"]["toy.yaml"] == {"lr": 1e-05, "flag": "yes", "name": "1:20", "big": 1e6}
    workspace = clone(serial, tmp_path / "workspace")
    lines: list[str] = []
    times = restore_accepted(workspace, ORDER, accepted, lines.append)
    assert set(times) == {"index", "fetch", "checkout", "lock"} and len(lines) == 5
    assert lines[-1] == "# to git add: .gitignore dvc.lock out/.gitignore res/.gitignore"  # m.json at the root
    assert workspace_files(workspace) == workspace_files(serial)  # outputs, res/.gitignore, out/.gitignore, dvc.lock
    assert (workspace / "res" / ".gitignore").read_text() == "/a\n/b\n"
    assert status(workspace) == {}
    before = (workspace / "dvc.lock").stat().st_mtime_ns
    restore_accepted(workspace, ORDER, accepted)  # again: nothing to change, the lock is left alone
    assert (workspace / "dvc.lock").stat().st_mtime_ns == before
    assert workspace_files(workspace) == workspace_files(serial)


def test_a_lock_already_there_is_merged_as_dvc_merges_it(serial, tmp_path):
    """A workspace whose dvc.lock already has stage d (and one of another pipeline's stages): dvc repro keeps their
    places and appends the rest in its order; the restore must write the same bytes."""
    both = {}
    for name in ("by_dvc", "by_restore"):
        repo = both[name] = clone(serial, tmp_path / name)
        dvc(repo, "repro", "d")  # dvc.lock holds d alone
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        assert list(lock["stages"]) == ["d"]
    dvc(both["by_dvc"], "repro")
    restore_accepted(both["by_restore"], ORDER, load_lock(serial / "dvc.lock"))
    assert (both["by_restore"] / "dvc.lock").read_bytes() == (both["by_dvc"] / "dvc.lock").read_bytes()
    assert list(yaml.safe_load((both["by_restore"] / "dvc.lock").read_text())["stages"]) == ["d", "a", "b", "c"]
    assert workspace_files(both["by_restore"]) == workspace_files(both["by_dvc"])
    assert status(both["by_restore"]) == {}


def test_changed_outputs_are_replaced_and_a_partial_restore_touches_only_its_stages(serial, tmp_path):
    """An output edited by hand is replaced (dvc repro removes a stage's outputs before restoring it); restoring a
    subset (the stages that finished when another failed) writes only their entries."""
    accepted = load_lock(serial / "dvc.lock")
    workspace = clone(serial, tmp_path / "workspace")
    restore_accepted(workspace, ["a", "d"], {name: accepted[name] for name in ("a", "d")})
    assert set(yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]) == {"a", "d"}
    assert not (workspace / "res" / "b").exists() and not (workspace / "out" / "c.txt").exists()
    assert status(workspace, "a", "d") == {}
    (workspace / "res" / "a" / "x.txt").write_text("edited\n")
    (workspace / "res" / "a" / "extra.txt").write_text("not an output of the run\n")
    restore_accepted(workspace, ORDER, accepted)
    assert workspace_files(workspace) == workspace_files(serial)
    assert status(workspace) == {}


def test_the_coordinator_checks_the_restored_stages_with_dvc_status(serial, tmp_path):
    """cluster_repro.restore: clean for a partial restore (the stages not restored may differ), not clean when an
    accepted entry does not match the workspace (here a param the workspace's params file does not have)."""
    from stages.cluster_repro import restore

    accepted = load_lock(serial / "dvc.lock")
    workspace = clone(serial, tmp_path / "workspace")
    with contextlib.chdir(workspace):
        clean, log, times = restore(workspace, ["a", "d"], accepted, tmp_path / "partial.log")
    assert clean, log
    assert set(times) == {"index", "fetch", "checkout", "lock", "status", "total"}
    assert status(workspace) != {} and "changed: none" in log  # b and c are not restored: not this restore's
    wrong = {**accepted, "d": {**accepted["d"], "params": {"toy.yaml": {"other": 4}}}}
    with contextlib.chdir(workspace):
        clean, log, _ = restore(workspace, ORDER, wrong, tmp_path / "wrong.log")
    assert not clean and '"d"' in log and "FAILED: dvc status" in log
    assert (tmp_path / "wrong.log").read_text().strip() == log.strip()


def test_core_autostage_is_honoured_as_dvc_repro_honours_it(serial, tmp_path):
    workspace = clone(serial, tmp_path / "workspace")
    dvc(workspace, "config", "core.autostage", "true")
    restore_accepted(workspace, ORDER, load_lock(serial / "dvc.lock"))
    staged = run(["git", "diff", "--cached", "--name-only"], workspace).stdout.split()
    assert sorted(staged) == [".gitignore", "dvc.lock", "out/.gitignore", "res/.gitignore"]


def test_data_missing_on_the_remote_fails_before_any_lock_is_written(serial, tmp_path):
    accepted = load_lock(serial / "dvc.lock")
    workspace = clone(serial, tmp_path / "workspace")
    shutil.copytree(serial.parent / "remote", tmp_path / "remote")
    dvc(workspace, "remote", "modify", "shared", "url", str(tmp_path / "remote"))
    md5 = next(out["md5"] for out in accepted["d"]["outs"])
    (tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    with pytest.raises(RestoreError, match="1 outputs are neither in the cache nor on the remote, e.g. out/d.txt of d"):
        restore_accepted(workspace, ORDER, accepted)
    assert not (workspace / "dvc.lock").exists()  # a kill or failure leaves no entry naming a missing output
    with pytest.raises(RestoreError, match="not stages of this workspace"):
        restore_accepted(workspace, ["nope"], {"nope": {}})


def test_lock_text_is_dvc_s_merge():
    entry = {"cmd": "python x.py", "outs": [{"path": "o", "hash": "md5", "md5": "1" * 32, "size": 3}]}
    fresh = lock_text(None, {"s": entry})
    assert fresh.startswith("schema: '2.0'\nstages:\n  s:\n")
    assert yaml.safe_load(fresh)["stages"]["s"]["outs"][0]["md5"] == "1" * 32  # quoted: not read as an int
    assert lock_text(fresh, {"s": entry}) is None  # nothing changes: DVC leaves the file alone
    merged = lock_text(fresh, {"t": entry, "s": {**entry, "cmd": "python y.py"}})
    assert list(yaml.safe_load(merged)["stages"]) == ["s", "t"]  # s keeps its place, t follows


def test_the_entry_point_on_this_pipeline_equals_a_serial_repro(serial, tmp_path_factory):
    """python -m stages.cluster_repro (local Ray instance) on the toy pipeline: the workers' lock entries go
    through the restore into the workspace, which must end byte-identical to the serial run's."""
    base = tmp_path_factory.mktemp("entry")
    workspace = base / "workspace"
    toy(workspace, base / "remote")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_TMPDIR=str(base / "ray"))
    result = subprocess.run([sys.executable, "-m", "stages.cluster_repro", "--no-live", "--num-cpus", "2"],
                            cwd=workspace, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workspace / ".dvc/tmp/cluster-logs/summary.json").read_text())
    assert summary["restore_ok"] and summary["lock_mismatches"] == []
    assert {stage["status"] for stage in summary["stages"].values()} == {"ran"}
    assert set(summary["restore_phases_s"]) == {"index", "fetch", "checkout", "lock", "status", "total"}
    assert workspace_files(workspace) == workspace_files(serial)
    assert status(workspace) == {}


def test_upstream_outputs_are_git_ignored_in_dvc_repro_s_order_in_the_workers_too(tmp_path_factory):
    """Two stages whose names sort against dvc repro's order (z_first runs before a_second) write into one folder,
    which a third stage depends on: DVC's .gitignore there is part of the folder's hash, so the worker of the third
    stage must write it in dvc repro's order (as the serial run and the final restore do), not by name."""
    base = tmp_path_factory.mktemp("order")
    stages = {
        "z_first": {"cmd": "python make.py z_first", "deps": ["make.py"], "outs": ["res/z"]},
        "a_second": {"cmd": "python make.py a_second res/z", "deps": ["make.py", "res/z"], "outs": ["res/a"]},
        "folder": {"cmd": "python make.py folder res", "deps": ["make.py", "res"], "outs": ["out/folder.txt"]},
    }
    make = MAKE.replace('else:\n    Path("out")', 'elif name in ("z_first", "a_second"):\n'
                        '    Path("res").mkdir(exist_ok=True)\n    Path("res", name[0]).write_text(value + "\\n")\n'
                        'else:\n    Path("out")')
    for name in ("serial", "workspace"):
        repo = base / name
        repo.mkdir()
        (repo / "make.py").write_text(make)
        shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
        (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
        git(repo, "init", "-q")
        dvc(repo, "init", "-q")
        dvc(repo, "remote", "add", "-d", "shared", str(base / f"{name}-remote"))
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "toy")
    dvc(base / "serial", "repro")
    assert (base / "serial" / "res" / ".gitignore").read_text() == "/z\n/a\n"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_TMPDIR=str(base / "ray"))
    result = subprocess.run([sys.executable, "-m", "stages.cluster_repro", "--no-live", "--num-cpus", "2"],
                            cwd=base / "workspace", env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert workspace_files(base / "workspace") == workspace_files(base / "serial")
