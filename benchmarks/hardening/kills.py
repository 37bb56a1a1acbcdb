"""kill -9 at random points of every stage, then the outputs are checked before any rerun.

Per stage, in a copy of the built tiny study: the stage's declared outputs are deleted, the stage command runs
uninterrupted once (its duration sets the kill window, and it must reproduce the reference bytes), then each trial
deletes the outputs again, starts the command, SIGKILLs its whole process group at a random time within its
duration, and checks every declared output: absent, or complete and valid (the project's own loaders, JSON parses,
directories hold the full file set, deterministic files equal the reference). Then the command is rerun (training
resumes from its checkpoints) and the outputs must be byte-identical to the reference where the stage is
deterministic (JSON compared without timing fields). Killing ``dvc repro`` itself must not leave a stage running.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

RUN = f"bc_flow/{DATASET}/task{NUMBER}/seed0"
RUN_ARGS = ["--dataset", DATASET, "--task", str(NUMBER), "--seed", "0", "--no-progress"]
_TEMP_NAME = re.compile(r"(\.tmp$|\.partial-|\.old-|^\.|tmp\d|\.orbax-checkpoint-tmp)")
_TIMING_KEY = re.compile(r"(time|second|duration|elapsed|resumed|date|_s$|^started|^finished)", re.IGNORECASE)


@dataclass(frozen=True)
class StageSpec:
    name: str  # the dvc stage
    command: list[str]  # run from the study's root
    outs: tuple[str, ...]  # declared outputs (dvc.yaml outs, metrics, plots), relative to the root
    deterministic: bool  # reruns give the same bytes (JSON: without timing fields)
    extra_clean: tuple[str, ...] = ()  # deleted before each fresh start (not before the rerun): checkpoints


def stage_specs() -> list[StageSpec]:
    py = [sys.executable, "-m"]
    return [
        StageSpec(f"download@{DATASET}", [*py, "stages.download", "--dataset", DATASET],
                  (f"data/datasets/{DATASET}",), True),
        StageSpec(f"prior@{DATASET}", [*py, "stages.prior", "--dataset", DATASET], (f"data/priors/{DATASET}",),
                  True),
        StageSpec(f"reverse@{DATASET}", [*py, "stages.reverse", "--dataset", DATASET],
                  (f"data/reversed/{DATASET}",), True),
        StageSpec(f"train_bc_flow@bc_flow-{DATASET}-{NUMBER}-0", [*py, "stages.train", "--agent", "bc_flow", *RUN_ARGS],
                  (f"data/runs/{RUN}/policy.msgpack", f"data/runs/{RUN}/summary.json",
                   f"data/runs/{RUN}/live/metrics.json", f"data/runs/{RUN}/live/plots/metrics"), True,
                  (f"data/checkpoints/{RUN}",)),
        StageSpec(f"evaluate_bc_flow@bc_flow-{DATASET}-{NUMBER}-0",
                  [*py, "stages.evaluate", "--agent", "bc_flow", *RUN_ARGS],
                  (f"data/evals/{RUN}", f"data/evals/{RUN}.json"), True),
        StageSpec("report", [*py, "stages.report"], ("reports",), False),
    ]


# --------------------------------------------------------------------------------------------------------------
# Output checks


def _files(path: Path) -> dict[str, Path]:
    """The files of an output (DVC's own .gitignore files excluded: DVC writes them, not the stage)."""
    if path.is_file():
        return {"": path}
    return {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".gitignore"}


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if not _TIMING_KEY.search(k)}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


def validate_file(path: Path) -> str | None:
    """None if ``path`` is a complete, valid file of its type (the project's own loaders), else the problem."""
    name = path.name
    try:
        if name.endswith(".npz"):
            from stages.core.ogbench_data import validate_raw_file

            validate_raw_file(path)
        elif name.endswith(".msgpack"):
            from stages.core.policy_file import load_policy

            load_policy(path)
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            pq.read_table(path)
        elif name.endswith(".gif"):
            data = path.read_bytes()
            if not (data.startswith(b"GIF8") and data.endswith(b";")):
                return "GIF without its trailer: partial"
        elif name.endswith(".png"):
            if not path.read_bytes().endswith(b"IEND\xaeB`\x82"):
                return "PNG without IEND: partial"
        elif name.endswith(".html"):
            if not path.read_text(errors="replace").rstrip().endswith("</html>"):
                return "HTML without </html>: partial"
        elif path.stat().st_size == 0:
            return "empty file"
    except Exception as exc:  # noqa: BLE001  (any failure to load is what is being looked for)
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return None


def same_content(path: Path, reference: Path) -> bool:
    if path.suffix == ".json":
        try:
            return _strip_timing(json.loads(path.read_text())) == _strip_timing(json.loads(reference.read_text()))
        except ValueError:
            return False
    return path.read_bytes() == reference.read_bytes()


def _compared(relative: str) -> bool:
    """Files whose bytes a deterministic stage reproduces (dvclive's plot TSVs carry wall-clock timestamps)."""
    return not relative.endswith(".tsv") and "/plots/" not in f"/{relative}"


def check_outputs(study: Path, reference: Path, spec: StageSpec, after_rerun: bool) -> list[str]:
    """Problems of the stage's declared outputs in ``study`` (empty: all absent, or complete and valid)."""
    problems = []
    for out in spec.outs:
        path, ref = study / out, reference / out
        if not path.exists():
            if after_rerun:
                problems.append(f"{out}: missing after the rerun")
            continue
        have, want = _files(path), _files(ref)
        leftovers = sorted(k for k in set(have) - set(want) if _TEMP_NAME.search(Path(k).name or path.name))
        if not after_rerun and path.is_dir() and set(have) <= set(leftovers):
            continue  # an empty folder (or one with temporary files only): nothing there looks finished
        foreign = sorted(set(have) - set(want) - set(leftovers))
        missing = sorted(set(want) - set(have))
        if missing:
            problems.append(f"{out}: partial ({len(missing)} of {len(want)} files missing, e.g. {missing[0]})")
        if foreign:
            problems.append(f"{out}: unexpected files {foreign[:3]}")
        if leftovers and after_rerun:
            problems.append(f"{out}: temporary files left behind {leftovers[:3]}")
        for key, file in have.items():
            if key in leftovers or key in foreign:
                continue
            problem = validate_file(file)
            label = f"{out}/{key}" if key else out
            if problem:
                problems.append(f"{label}: {problem}")
            elif spec.deterministic and key in want and _compared(key) and not same_content(file, want[key]):
                problems.append(f"{label}: differs from the uninterrupted run")
    return problems


def remove_outputs(study: Path, spec: StageSpec, fresh: bool) -> None:
    for out in spec.outs + (spec.extra_clean if fresh else ()):
        path = study / out
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for out in spec.outs:  # temp siblings an earlier kill left beside an output
        parent = (study / out).parent
        if parent.is_dir():
            for sibling in parent.iterdir():
                if sibling.name.startswith(f".{Path(out).name}.") or sibling.name.startswith(f"{Path(out).name}.tmp"):
                    shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink()


# --------------------------------------------------------------------------------------------------------------
# Trials


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_stage(reference: Path, workdir: Path, spec: StageSpec, trials: int, rng: random.Random,
               log: Callable[[str], None]) -> list[Result]:
    category = "kill"
    study = clone_study(reference, workdir / f"kill-{spec.name.split('@')[0]}")
    results = []
    try:
        remove_outputs(study, spec, fresh=True)
        started = time.monotonic()
        first = run(spec.command, study, timeout=1800)
        duration = time.monotonic() - started
        if first.returncode != 0:
            return [Result(category, f"{spec.name} uninterrupted", False,
                           f"exit {first.returncode}: {last_error_line(first.stderr)}")]
        problems = check_outputs(study, reference, spec, after_rerun=True)
        results.append(Result(category, f"{spec.name} uninterrupted run reproduces the reference", not problems,
                              "; ".join(problems[:2])))
        log(f"kill {spec.name}: uninterrupted run {duration:.1f} s")
        for trial in range(trials):
            remove_outputs(study, spec, fresh=True)
            at = rng.uniform(0.02, 0.8) * duration  # the first run is the slowest (cold caches)
            process = _start(spec.command, study)
            try:
                process.wait(timeout=at)
                finished = True
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                finished = False
            time.sleep(0.3)
            leftovers = kill_leftovers(study)
            name = f"{spec.name} killed at {at:.1f} s" + (" (finished first)" if finished else "")
            problems = check_outputs(study, reference, spec, after_rerun=False)
            if leftovers:
                problems.append(f"{len(leftovers)} processes outlived the killed process group")
            rerun = run(spec.command, study, timeout=1800)
            if rerun.returncode != 0:
                problems.append(f"rerun exit {rerun.returncode}: {last_error_line(rerun.stderr)}")
            else:
                problems += [f"after rerun: {p}" for p in check_outputs(study, reference, spec, after_rerun=True)]
            results.append(Result(category, name, not problems, "; ".join(problems[:3])))
            log(f"kill {name}: {'ok' if not problems else problems[0]}")
    finally:
        kill_leftovers(study)
        shutil.rmtree(study, ignore_errors=True)
    return results


def kill_dvc_parent(reference: Path, workdir: Path, spec: StageSpec, log: Callable[[str], None]) -> Result:
    """SIGKILL ``dvc repro`` (only the dvc process) while its stage runs: no stage python may survive it."""
    category = "kill-dvc"
    study = clone_study(reference, workdir / f"parent-{spec.name.split('@')[0]}")
    try:
        command = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", spec.name]
        process = subprocess.Popen(command, cwd=study, env=environment(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        module = spec.command[2]
        deadline = time.monotonic() + 300
        child = []
        while time.monotonic() < deadline and process.poll() is None:
            child = [p for p in kill_free_list(study) if module in p[1] and p[0] != process.pid]
            if child:
                break
            time.sleep(0.1)
        if not child:
            process.kill()
            process.wait()
            return Result(category, f"dvc repro {spec.name} killed", False, "the stage never started under dvc")
        time.sleep(1.0)  # the stage is running
        process.send_signal(signal.SIGKILL)
        process.wait()
        time.sleep(3.0)
        survivors = [p for p in kill_free_list(study) if p[0] != process.pid]
        leftovers = kill_leftovers(study)
        ok = not survivors
        detail = "" if ok else (f"{len(survivors)} processes still running 3 s after dvc died: "
                                f"{survivors[0][1][:100]}")
        log(f"kill dvc parent of {spec.name}: {'ok' if ok else detail}")
        del leftovers
        return Result(category, f"dvc repro {spec.name} killed: no orphan", ok, detail)
    finally:
        kill_leftovers(study)
        shutil.rmtree(study, ignore_errors=True)


def kill_free_list(study: Path) -> list[tuple[int, str]]:
    from benchmarks.hardening.common import stage_pythons

    return stage_pythons(study)


def campaign(reference: Path, workdir: Path, trials: int, seed: int, log: Callable[[str], None],
             only: str | None = None) -> list[Result]:
    """Every stage killed ``trials`` times, then ``dvc repro`` killed under four stages; ``only``: stages whose
    name contains it (``dvc`` selects the dvc-parent kills alone)."""
    rng = random.Random(seed)
    results = []
    for spec in stage_specs():
        if not only or only in spec.name:
            results += kill_stage(reference, workdir, spec, trials, rng, log)
    for spec in stage_specs()[1:5]:
        if not only or only in spec.name or only == "dvc":
            results.append(kill_dvc_parent(reference, workdir, spec, log))
    return results
