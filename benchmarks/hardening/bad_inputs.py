"""Bad inputs through the real entry points: each case breaks one thing in a copy of the built tiny study, runs the
stage command (or ``dvc``), and expects a non-zero exit, a last stderr line ``error: ...`` naming the file or key
and the problem, and none of the stage's outputs (they are deleted first, so anything there is partial output).

Cases are declarative (:class:`Case`); ``CASES`` lists them, so the table counts them.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.hardening.common import (
    DATASET,
    NUMBER,
    Result,
    clone_study,
    environment,
    kill_leftovers,
    last_error_line,
    run,
)

PY = [sys.executable, "-m"]
DVC = [sys.executable, "-m", "dvc"]
DATASET_DIR = f"data/datasets/{DATASET}"
DATASET_FILE = f"{DATASET_DIR}/{DATASET}.npz"
CACHE = f"data/reversed/{DATASET}"
PRIOR = f"data/priors/{DATASET}/policy.msgpack"
TASK_RUN = f"{DATASET}/task{NUMBER}/seed0"  # below each agent's folder in data/runs, data/evals, data/checkpoints
RUN_BC = f"data/runs/bc_flow/{TASK_RUN}"
RUN_CACHED = f"data/runs/rql_cached/{TASK_RUN}"
EVAL_BC = f"data/evals/bc_flow/{TASK_RUN}"
CHECKPOINTS_BC = f"data/checkpoints/bc_flow/{TASK_RUN}"

RUN_ARGS = ["--dataset", DATASET, "--task", str(NUMBER), "--seed", "0", "--no-progress"]
PRIOR_CMD = [*PY, "stages.prior", "--dataset", DATASET]
REVERSE_CMD = [*PY, "stages.reverse", "--dataset", DATASET]
TRAIN_BC_CMD = [*PY, "stages.train", "--agent", "bc_flow", *RUN_ARGS]
TRAIN_CACHED_CMD = [*PY, "stages.train", "--agent", "rql_cached", *RUN_ARGS]
EVAL_CMD = [*PY, "stages.evaluate", "--agent", "bc_flow", *RUN_ARGS]
DOWNLOAD_CMD = [*PY, "stages.download", "--dataset", DATASET]

PRIOR_OUTS = (f"data/priors/{DATASET}",)
TRAIN_BC_OUTS = (f"{RUN_BC}/policy.msgpack", f"{RUN_BC}/summary.json", f"{RUN_BC}/live")
TRAIN_CACHED_OUTS = (f"{RUN_CACHED}/policy.msgpack", f"{RUN_CACHED}/summary.json", f"{RUN_CACHED}/live")
EVAL_OUTS = (EVAL_BC, f"{EVAL_BC}.json")


@dataclass
class Case:
    """One bad input: how to break the study, the command, what the error must name, the outputs that must not
    exist afterwards. ``check`` replaces the default expectation (non-zero exit, one-line named error)."""

    name: str
    category: str
    breaks: Callable[[Path], None]
    command: list[str]
    names: tuple[str, ...]
    outs: tuple[str, ...] = ()
    check: Callable[[Path, Path, subprocess.CompletedProcess], str | None] | None = None
    limit_fsize: int | None = None
    timeout: float = 900
    env: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Ways to break things


def edit_params(**changes: object) -> Callable[[Path], None]:
    """Set dotted keys of params.yaml (``train__stepz=5`` -> train.stepz: 5); a value ``DELETE`` removes the key."""
    def breaks(study: Path) -> None:
        params = yaml.safe_load((study / "params.yaml").read_text())
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            node = params
            for key in parents:
                node = node[key]
            if value == "DELETE":
                del node[last]
            else:
                node[last] = value
        (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return breaks


def write_text(relative: str, text: str) -> Callable[[Path], None]:
    return lambda study: (study / relative).write_text(text)


def flip_byte(relative: str, where: float = 0.5) -> Callable[[Path], None]:
    def breaks(study: Path) -> None:
        path = study / relative
        data = bytearray(path.read_bytes())
        data[int(len(data) * where)] ^= 0x5A
        path.write_bytes(bytes(data))
    return breaks


def truncate(relative: str, keep: float = 0.5) -> Callable[[Path], None]:
    def breaks(study: Path) -> None:
        path = study / relative
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return breaks


def delete(relative: str) -> Callable[[Path], None]:
    def breaks(study: Path) -> None:
        path = study / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return breaks


def edit_arrays(edit: Callable[[dict], None], relative: str = DATASET_FILE) -> Callable[[Path], None]:
    def breaks(study: Path) -> None:
        import numpy as np

        with np.load(study / relative, allow_pickle=False) as archive:
            arrays = {key: archive[key].copy() for key in archive.files}
        edit(arrays)
        buffer = study / relative
        with open(buffer, "wb") as stream:
            np.savez_compressed(stream, **arrays)
    return breaks


def pickled_dataset(study: Path) -> None:
    import numpy as np

    with open(study / DATASET_FILE, "wb") as stream:
        np.savez(stream, observations=np.array([{"a": 1}], dtype=object))


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def breaks(study: Path) -> None:
        path = study / CACHE / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=2))
    return breaks


def copy_file(source: str, target: str) -> Callable[[Path], None]:
    return lambda study: shutil.copyfile(study / source, study / target)


def _newest_checkpoint(study: Path) -> Path:
    steps = [p for p in (study / CHECKPOINTS_BC).glob("*/*") if p.name.isdigit()]
    return max(steps, key=lambda p: int(p.name))


def damage_checkpoint(how: str, every: bool = False) -> Callable[[Path], None]:
    def breaks(study: Path) -> None:
        steps = [p for p in (study / CHECKPOINTS_BC).glob("*/*") if p.name.isdigit()] if every else \
            [_newest_checkpoint(study)]
        for step in steps:
            files = sorted((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            target = files[-1]
            if how == "truncate":
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            elif how == "flip":
                data = bytearray(target.read_bytes())
                data[len(data) // 2] ^= 0xFF
                target.write_bytes(bytes(data))
            elif how == "metadata":
                for meta in step.rglob("_CHECKPOINT_METADATA"):
                    meta.unlink()
            else:
                shutil.rmtree(step / "state")
    return breaks


def _cache_object(study: Path, relative: str) -> Path:
    """The DVC cache object of one file of the study's outputs (looked up by its md5 in dvc.lock)."""
    lock = yaml.safe_load((study / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == relative:
                md5 = out["md5"]
                return study / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
            if relative.startswith(out["path"] + "/"):
                listing = study / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
                entries = json.loads(listing.read_text())
                name = relative[len(out["path"]) + 1:]
                md5 = next(e["md5"] for e in entries if e["relpath"] == name)
                return study / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    raise KeyError(relative)


def corrupt_cache_object(relative: str, remove_workspace: bool) -> Callable[[Path], None]:
    def breaks(study: Path) -> None:
        obj = _cache_object(study, relative)
        os.chmod(obj, 0o644)
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0xFF
        obj.write_bytes(bytes(data))
        if remove_workspace:
            (study / relative).unlink()
    return breaks


def _checked_out(breaks: Callable[[Path], None]) -> Callable[[Path], None]:
    """``breaks``, then ``dvc checkout`` (which copies a damaged object into the workspace and exits 0)."""
    def then_checkout(study: Path) -> None:
        breaks(study)
        run([*DVC, "checkout"], study)
    return then_checkout


def corrupt_remote_object(relative: str, drop: bool = False) -> Callable[[Path], None]:
    """Damage (or delete) the remote's copy of one file, then make the study a fresh clone without a cache."""
    def breaks(study: Path) -> None:
        obj = _cache_object(study, relative)
        config = (study / ".dvc" / "config").read_text()
        remote = Path(next(line.split("=", 1)[1].strip() for line in config.splitlines() if "url" in line))
        if not remote.is_absolute():
            remote = (study / ".dvc" / remote).resolve()
        copy = study.parent / f"{study.name}-remote"
        shutil.copytree(remote, copy)
        target = copy / obj.relative_to(study / ".dvc" / "cache")
        if drop:
            target.unlink()
        else:
            os.chmod(target, 0o644)
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        shutil.rmtree(study / ".dvc" / "cache")
        for out in ("data/datasets", "data/priors", "data/reversed"):
            shutil.rmtree(study / out, ignore_errors=True)
        run([*DVC, "remote", "modify", "local", "url", str(copy)], study)
    return breaks


# --------------------------------------------------------------------------------------------------------------
# Expectations


def _dvc_named(names: tuple[str, ...]) -> Callable[[Path, Path, subprocess.CompletedProcess], str | None]:
    """DVC's own errors are acceptable if they name the object: a non-zero exit and an ERROR line naming it."""
    def check(study: Path, reference: Path, result: subprocess.CompletedProcess) -> str | None:
        text = result.stdout + result.stderr
        workspace_ok = (study / DATASET_FILE).is_file() and (study / DATASET_FILE).read_bytes() == (
            reference / DATASET_FILE).read_bytes()
        if result.returncode == 0:
            if workspace_ok:
                return None  # DVC noticed and refetched or refused the bad object: the workspace is right
            present = (study / DATASET_FILE).is_file()
            return "exit 0 and the workspace holds " + ("the corrupt object" if present else "no dataset")
        errors = [line for line in text.splitlines() if line.lower().startswith("error")]
        if not errors:
            return f"exit {result.returncode} without an ERROR line"
        try:
            md5 = _cache_object(reference, DATASET_FILE).name  # the object's hash (without its 2-character folder)
        except (OSError, KeyError, StopIteration, ValueError):
            md5 = "(unknown object)"
        if not any(n.lower() in text.lower() for n in (*names, md5)):
            return f"DVC's output names neither {names} nor the object {md5[:8]}...: {errors[-1][:120]}"
        if (study / DATASET_FILE).is_file() and not workspace_ok:
            return "the corrupt object was checked out into the workspace"
        return None
    return check


def _status_names_modified(study: Path, reference: Path, result: subprocess.CompletedProcess) -> str | None:
    text = result.stdout + result.stderr
    if "modified" in text and "data/datasets" in text:
        return None
    return f"dvc status does not report the modified dataset: {text.strip()[:140]!r}"


def _recovers_or_names(names: tuple[str, ...]) -> Callable[[Path, Path, subprocess.CompletedProcess], str | None]:
    """A damaged newest checkpoint: resume from the previous good one (same policy bytes), or a clear error."""
    def check(study: Path, reference: Path, result: subprocess.CompletedProcess) -> str | None:
        if result.returncode == 0:
            policy = study / RUN_BC / "policy.msgpack"
            if policy.read_bytes() == (reference / RUN_BC / "policy.msgpack").read_bytes():
                return None
            return "exit 0 but the policy differs from the uninterrupted run"
        return _default_check(names, TRAIN_BC_OUTS)(study, reference, result)
    return check


def _default_check(names: tuple[str, ...], outs: tuple[str, ...],
                   via_dvc: bool = False) -> Callable[[Path, Path, subprocess.CompletedProcess], str | None]:
    def check(study: Path, reference: Path, result: subprocess.CompletedProcess) -> str | None:
        if result.returncode == 0:
            return "exit 0: the bad input was accepted"
        if via_dvc:
            lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            line = lines[-1] if lines else ""
        else:
            line = last_error_line(result.stderr)
        if not line.startswith("error:"):
            lines = [entry for entry in result.stderr.strip().splitlines() if entry.strip()]
            starts = [i for i, entry in enumerate(lines) if entry.startswith("error:")]
            if starts:
                first = lines[starts[-1]]
                return (f"multi-line error ({len(lines) - starts[-1]} lines): {first[:90]!r} ... "
                        f"{lines[-1].strip()[:70]!r}")
            return f"exit {result.returncode}, no 'error: ...' line; last: {line[:140]!r}"
        missing = [n for n in names if n.lower() not in line.lower()]
        if missing:
            return f"error line does not name {missing}: {line[:160]!r}"
        partial = [out for out in outs if (study / out).exists()]
        if partial:
            return f"partial output left: {partial[0]}"
        return None
    return check


# --------------------------------------------------------------------------------------------------------------
# The cases


def _params(name: str, names: tuple[str, ...], **changes: object) -> Case:
    return Case(f"params: {name}", "params", edit_params(**changes), PRIOR_CMD, names, PRIOR_OUTS)


def _nan_rows(arrays: dict) -> None:
    arrays["observations"][7] = float("nan")


def _cases() -> list[Case]:
    return [
        _params("unknown key train.stepz", ("train.stepz",), train__stepz=5),
        _params("unknown top-level key foo", ("foo",), foo=1),
        _params("train.steps a string", ("train.steps",), train__steps="ten"),
        _params("train.steps negative", ("train.steps",), train__steps=-5),
        _params("task number out of range", ("tasks",), tasks=[9]),
        _params("not an OGBench dataset", ("datasets",), datasets=["halfcheetah-medium-v2"]),
        _params("duplicate task numbers", ("tasks",), tasks=[2, 2]),
        _params("agent.batch_size 0", ("agent.batch_size",), agent__batch_size=0),
        _params("flow.steps 0", ("flow.steps",), flow__steps=0),
        _params("networks.actor empty", ("networks.actor",), networks__actor=[]),
        _params("networks.critic negative width", ("networks.critic",), networks__critic=[32, -1]),
        _params("reverse.method unknown", ("reverse.method",), reverse__method="sideways"),
        _params("evaluate.episodes 0", ("evaluate.episodes",), evaluate__episodes=0),
        _params("agent.tau above 1", ("agent.tau",), agent__tau=2.0),
        _params("agent.ema 1.0", ("agent.ema",), agent__ema=1.0),
        _params("duplicate seeds", ("seeds",), seeds=[0, 0]),
        _params("every agent group empty", ("agent",), agents={"rql": [], "rql_cached": [], "fql": [],
                                                                 "bc_flow": []}),
        _params("data.source unknown", ("data.source",), data__source="ftp"),
        _params("train.device tpu", ("train.device",), train__device="tpu"),
        _params("a required section missing", ("train",), train="DELETE"),
        Case("params: params.yaml not YAML", "params", write_text("params.yaml", "tasks: [a\n  b: :\n"),
             PRIOR_CMD, ("params.yaml",), PRIOR_OUTS),
        Case("params: params.yaml empty", "params", write_text("params.yaml", ""), PRIOR_CMD, ("params.yaml",),
             PRIOR_OUTS),
        Case("params: dvc repro with train.stepz", "params", edit_params(train__stepz=5), [*DVC, "repro"],
             ("train.stepz",), PRIOR_OUTS, check=_default_check(("train.stepz",), (), via_dvc=True)),
        # datasets fed to prior and train
        Case("dataset: truncated, to prior", "dataset", truncate(DATASET_FILE), PRIOR_CMD, ("cube-single-play-v0.npz",),
             PRIOR_OUTS),
        Case("dataset: one byte flipped, to train", "dataset", flip_byte(DATASET_FILE), TRAIN_BC_CMD,
             ("cube-single-play-v0.npz",), TRAIN_BC_OUTS),
        Case("dataset: empty file", "dataset", write_text(DATASET_FILE, ""), PRIOR_CMD, ("cube-single-play-v0.npz",),
             PRIOR_OUTS),
        Case("dataset: missing file, to train", "dataset", delete(DATASET_FILE), TRAIN_BC_CMD,
             ("cube-single-play-v0.npz",), TRAIN_BC_OUTS),
        Case("dataset: observations float64", "dataset",
             edit_arrays(lambda a: a.update(observations=a["observations"].astype("float64"))), PRIOR_CMD,
             ("cube-single-play-v0.npz", "observations"), PRIOR_OUTS),
        Case("dataset: actions with 4 columns", "dataset",
             edit_arrays(lambda a: a.update(actions=a["actions"][:, :4].copy())), TRAIN_BC_CMD,
             ("cube-single-play-v0.npz", "actions"), TRAIN_BC_OUTS),
        Case("dataset: a NaN row", "dataset", edit_arrays(_nan_rows), PRIOR_CMD,
             ("cube-single-play-v0.npz", "observations"), PRIOR_OUTS),
        Case("dataset: last episode never ends", "dataset",
             edit_arrays(lambda a: a["terminals"].__setitem__(-1, False)), TRAIN_BC_CMD,
             ("cube-single-play-v0.npz", "episode"), TRAIN_BC_OUTS),
        Case("dataset: actions outside [-1, 1]", "dataset",
             edit_arrays(lambda a: a.update(actions=a["actions"] * 3)), PRIOR_CMD,
             ("cube-single-play-v0.npz", "actions"), PRIOR_OUTS),
        Case("dataset: pickled object array", "dataset", pickled_dataset, PRIOR_CMD,
             ("cube-single-play-v0.npz",), PRIOR_OUTS),
        Case("dataset: an extra key", "dataset",
             edit_arrays(lambda a: a.update(rewards=a["terminals"].astype("float32"))), PRIOR_CMD,
             ("cube-single-play-v0.npz", "rewards"), PRIOR_OUTS),
        # the reversal cache fed to cached training
        Case("shards: a bit flip", "shards", flip_byte(f"{CACHE}/part-00001.parquet"), TRAIN_CACHED_CMD,
             ("part-00001.parquet",), TRAIN_CACHED_OUTS),
        Case("shards: truncated", "shards", truncate(f"{CACHE}/part-00000.parquet"), TRAIN_CACHED_CMD,
             ("part-00000.parquet",), TRAIN_CACHED_OUTS),
        Case("shards: a shard missing", "shards", delete(f"{CACHE}/part-00002.parquet"), TRAIN_CACHED_CMD,
             ("part-00002.parquet",), TRAIN_CACHED_OUTS),
        Case("shards: an extra shard", "shards",
             copy_file(f"{CACHE}/part-00000.parquet", f"{CACHE}/part-00003.parquet"), TRAIN_CACHED_CMD,
             ("part-00003.parquet",), TRAIN_CACHED_OUTS),
        Case("shards: manifest total_rows changed", "shards", edit_manifest(lambda m: m.update(total_rows=601)),
             TRAIN_CACHED_CMD, ("manifest.json", "total_rows"), TRAIN_CACHED_OUTS),
        Case("shards: manifest F changed", "shards", edit_manifest(lambda m: m.update(F=5)), TRAIN_CACHED_CMD,
             ("manifest.json", "F"), TRAIN_CACHED_OUTS),
        Case("shards: manifest not JSON", "shards", write_text(f"{CACHE}/manifest.json", "{\"format\": "),
             TRAIN_CACHED_CMD, ("manifest.json",), TRAIN_CACHED_OUTS),
        Case("shards: manifest missing", "shards", delete(f"{CACHE}/manifest.json"), TRAIN_CACHED_CMD,
             ("manifest.json",), TRAIN_CACHED_OUTS),
        Case("shards: stale against the dataset", "shards",
             edit_manifest(lambda m: m["inputs"].update(dataset="0" * 64)), TRAIN_CACHED_CMD,
             ("manifest.json", "dataset"), TRAIN_CACHED_OUTS),
        Case("shards: stale against the prior", "shards",
             copy_file(f"{RUN_BC}/policy.msgpack", PRIOR), TRAIN_CACHED_CMD, ("prior",), TRAIN_CACHED_OUTS),
        # policy exports fed to evaluate
        Case("policy: truncated", "policy", truncate(f"{RUN_BC}/policy.msgpack"), EVAL_CMD, ("policy.msgpack",),
             EVAL_OUTS),
        Case("policy: one byte flipped", "policy", flip_byte(f"{RUN_BC}/policy.msgpack", 0.8), EVAL_CMD,
             ("policy.msgpack",), EVAL_OUTS),
        Case("policy: header byte flipped", "policy", flip_byte(f"{RUN_BC}/policy.msgpack", 0.0), EVAL_CMD,
             ("policy.msgpack",), EVAL_OUTS),
        Case("policy: empty file", "policy", write_text(f"{RUN_BC}/policy.msgpack", ""), EVAL_CMD,
             ("policy.msgpack",), EVAL_OUTS),
        Case("policy: missing", "policy", delete(f"{RUN_BC}/policy.msgpack"), EVAL_CMD, ("policy.msgpack",),
             EVAL_OUTS),
        Case("policy: from another config (FQL's export)", "policy",
             copy_file(f"data/runs/fql/{TASK_RUN}/policy.msgpack", f"{RUN_BC}/policy.msgpack"), EVAL_CMD,
             ("policy.msgpack",), EVAL_OUTS),
        Case("policy: from another run (RQL's export)", "policy",
             copy_file(f"data/runs/rql/{TASK_RUN}/policy.msgpack", f"{RUN_BC}/policy.msgpack"), EVAL_CMD,
             ("policy.msgpack",), EVAL_OUTS),
        # checkpoints: a damaged newest step
        Case("checkpoint: newest step truncated", "checkpoint", damage_checkpoint("truncate"), TRAIN_BC_CMD,
             ("checkpoint",), TRAIN_BC_OUTS, check=_recovers_or_names(("checkpoint",))),
        Case("checkpoint: newest step bit flip", "checkpoint", damage_checkpoint("flip"), TRAIN_BC_CMD,
             ("checkpoint",), TRAIN_BC_OUTS, check=_recovers_or_names(("checkpoint",))),
        Case("checkpoint: newest step without its metadata", "checkpoint", damage_checkpoint("metadata"),
             TRAIN_BC_CMD, ("checkpoint",), TRAIN_BC_OUTS, check=_recovers_or_names(("checkpoint",))),
        Case("checkpoint: every step damaged", "checkpoint", damage_checkpoint("flip", every=True), TRAIN_BC_CMD,
             ("checkpoint",), TRAIN_BC_OUTS, check=_recovers_or_names(("checkpoint",))),
        # DVC's cache and remote
        Case("dvc cache: corrupt object, dvc checkout", "dvc", corrupt_cache_object(DATASET_FILE, True),
             [*DVC, "checkout"], ("cube-single-play-v0",), check=_dvc_named(("cube-single-play-v0",))),
        Case("dvc cache: corrupt object checked out, verify_cache", "dvc",
             _checked_out(corrupt_cache_object(DATASET_FILE, True)), [sys.executable, "-m", "stages.verify_cache"],
             ("cube-single-play-v0",)),
        Case("dvc cache: corrupt object, dvc status", "dvc", flip_byte(DATASET_FILE), [*DVC, "status"], (),
             check=_status_names_modified),
        Case("dvc remote: corrupt object, dvc pull", "dvc", corrupt_remote_object(DATASET_FILE), [*DVC, "pull"],
             ("cube-single-play-v0",), check=_dvc_named(("cube-single-play-v0",))),
        Case("dvc remote: missing object, dvc pull", "dvc", corrupt_remote_object(DATASET_FILE, drop=True),
             [*DVC, "pull"], ("cube-single-play-v0",), check=_dvc_named(("cube-single-play-v0",))),
        # a full disk during a write (RLIMIT_FSIZE: a write past the limit fails with EFBIG)
        Case("full disk: download", "disk", delete(DATASET_DIR), DOWNLOAD_CMD, ("File too large",),
             (DATASET_FILE, f"{DATASET_DIR}/manifest.json"), limit_fsize=20_000),
        Case("full disk: reverse", "disk", delete(CACHE), REVERSE_CMD, ("File too large",), (CACHE,),
             limit_fsize=20_000),
        Case("full disk: train", "disk", lambda s: None, TRAIN_BC_CMD, ("File too large",), TRAIN_BC_OUTS,
             limit_fsize=4_000),
    ]


CASES = _cases()


def _prepare(study: Path, case: Case) -> None:
    for out in case.outs:
        path = study / out
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if case.command[:3] == TRAIN_BC_CMD[:3] and case.category != "checkpoint":
        shutil.rmtree(study / "data" / "checkpoints", ignore_errors=True)


def run_case(reference: Path, workdir: Path, case: Case) -> Result:
    study = clone_study(reference, workdir / "bad-input")
    try:
        case.breaks(study)
        _prepare(study, case)
        limit = case.limit_fsize
        preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
        result = run(case.command, study, timeout=case.timeout, preexec_fn=preexec)
        check = case.check or _default_check(case.names, case.outs)
        problem = check(study, reference, result)
        return Result(case.category, case.name, problem is None, problem or "")
    except Exception as exc:  # noqa: BLE001  (a case that cannot be set up is reported, not fatal)
        return Result(case.category, case.name, False, f"harness: {type(exc).__name__}: {exc}")
    finally:
        kill_leftovers(study)
        shutil.rmtree(study, ignore_errors=True)
        shutil.rmtree(workdir / "bad-input-remote", ignore_errors=True)


def two_repros_at_once(reference: Path, workdir: Path) -> Result:
    """The second of two concurrent ``dvc repro`` in one workspace must fail clearly on DVC's lock."""
    study = clone_study(reference, workdir / "lock")
    first = None
    try:
        command = [*DVC, "repro", "--force", "--single-item", f"train_bc_flow@bc_flow-{DATASET}-{NUMBER}-0"]
        first = subprocess.Popen(command, cwd=study, env=environment(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        from benchmarks.hardening.common import stage_pythons

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None and not any(
                "stages.train" in c for _, c in stage_pythons(study)):
            time.sleep(0.1)
        second = run([*DVC, "repro"], study, timeout=300)
        text = second.stdout + second.stderr
        if first.poll() is not None:
            return Result("lock", "two dvc repro at once", False, "the first repro ended before the second began")
        if second.returncode == 0:
            return Result("lock", "two dvc repro at once", False, "the second dvc repro succeeded")
        if "lock" not in text.lower():
            return Result("lock", "two dvc repro at once", False, f"no lock error: {last_error_line(text)[:140]}")
        return Result("lock", "two dvc repro at once", True)
    finally:
        if first is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, 9)
            first.wait()
        kill_leftovers(study)
        shutil.rmtree(study, ignore_errors=True)


def tmpfs_full(reference: Path, workdir: Path) -> Result | None:
    """A full disk for real: the policy export written onto a tiny tmpfs (root only; None when not possible)."""
    mount = workdir / "tmpfs"
    mount.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                             check=False).returncode == 0
    if not mounted:
        mount.rmdir()
        return None
    study = clone_study(reference, workdir / "tmpfs-study")
    try:
        run_dir = study / RUN_BC
        shutil.rmtree(run_dir)
        filler = mount / "filler"
        with contextlib.suppress(OSError):
            filler.write_bytes(b"\0" * (60 * 1024))
        run_dir.symlink_to(mount, target_is_directory=True)
        shutil.rmtree(study / "data" / "checkpoints", ignore_errors=True)
        result = run(TRAIN_BC_CMD, study, timeout=900)
        problem = _default_check(("No space left",), ())(study, reference, result)
        leftovers = [p.name for p in mount.iterdir() if p.name != "filler"]
        if problem is None and any(name in ("policy.msgpack", "summary.json") for name in leftovers):
            problem = f"partial output on the full disk: {leftovers}"
        return Result("disk", "full disk (tmpfs): train's export", problem is None, problem or "")
    finally:
        kill_leftovers(study)
        shutil.rmtree(study, ignore_errors=True)
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            mount.rmdir()


def campaign(reference: Path, workdir: Path, log: Callable[[str], None], only: str | None = None) -> list[Result]:
    results = []
    for case in CASES:
        if only and only not in case.name:
            continue
        result = run_case(reference, workdir, case)
        log(f"bad input {case.name}: {'ok' if result.ok else result.detail}")
        results.append(result)
    if not only or "lock" in only:
        results.append(two_repros_at_once(reference, workdir))
        log(f"bad input two dvc repro: {'ok' if results[-1].ok else results[-1].detail}")
    if not only or "tmpfs" in only:
        tmpfs = tmpfs_full(reference, workdir)
        if tmpfs is not None:
            results.append(tmpfs)
            log(f"bad input tmpfs: {'ok' if tmpfs.ok else tmpfs.detail}")
    return results
