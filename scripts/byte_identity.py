"""Byte identity of the pipeline's artifacts between two versions of the code, compared by role, not by path.

Runs `dvc repro` of the train stages (download -> prior -> reverse -> train, every agent) of a study in a fresh
repository per side, then compares the datasets, the priors, the reversal shards and manifests and the policy
exports. `--study tiny` (default) is the TINY study of tests/test_pipeline.py, as each side's own
`write_tiny_params` writes it (so a side with another params shape still builds the same study); `--study default`
is each side's own params.yaml unchanged (the README's main job: ~15-30 min per side on 2 cores). A side is a git
revision (exported with `git archive`) or `worktree` (the files git sees in this checkout, uncommitted changes
included). A revision's results are kept in the work folder, so a baseline runs once.

Files are matched by role, so that layouts can differ: `dataset <name>: <file>` (OGBench's file names; the manifest
as `dataset <name>: manifest entry`, the dataset's entry and the library versions), `prior <dataset>: <file>`,
`reversal <dataset>: <file>`, `policy <agent> <task> seed<s>`. A prior or cache kept per task (before issue 11)
has the role of its task's dataset. Each role is byte-identical, or else compared by content: a policy export's
arrays and metadata separately, a JSON file key by key. The differing keys are listed; `--allow KEY` accepts a
difference at KEY (e.g. `metadata.task`), for changes a version makes on purpose.

    python scripts/byte_identity.py --baseline 11047dc --workdir /tmp/byte-identity                 # vs worktree
    python scripts/byte_identity.py --baseline 11047dc --candidate HEAD --study default --workdir /tmp/bi

Exits 1 when a data file, shard or policy's arrays differ, a role is missing on one side, or a JSON or metadata key
differs that `--allow` does not name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.core.ogbench_names import split_task, task_name
from stages.core.policy_file import decode_policy, leaf_paths
from tests.test_pipeline import copy_project, dvc, git, run

TRAIN_STAGES = ["train_rql", "train_rql_cached", "train_fql", "train_bc_flow"]
COMPARED = ["data/datasets/**/*", "data/priors/**/*", "data/reversed/**/*", "data/runs/**/policy.msgpack"]
FORMAT = 2  # of the saved results (1: path -> sha256 only)
TINY_PARAMS = ("import sys; from pathlib import Path; sys.path.insert(0, '.'); "
               "from tests.test_pipeline import write_tiny_params; write_tiny_params(Path('.'))")


def export(side: str, target: Path, study: str) -> None:
    """The code of ``side`` (a revision or ``worktree``) as a new git repository at ``target``, with the study's
    params written by that code's own tests."""
    target.mkdir(parents=True)
    if side == "worktree":
        copy_project(target)
    else:
        archive = subprocess.run(["git", "archive", side], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        (target / "dvc.lock").unlink(missing_ok=True)
        for sub in ("data", "reports"):
            shutil.rmtree(target / sub, ignore_errors=True)
    if study == "tiny":
        run([sys.executable, "-c", TINY_PARAMS], target)
    run(["git", "init", "-q"], target)
    git(target, "add", "-A")
    git(target, "commit", "-qm", f"{study} study at {side}")


def _dataset_of(key: str) -> str:
    """A prior's or cache's folder name: a dataset, or (before issue 11) a task, whose dataset it is."""
    return split_task(key).dataset if "-singletask" in key else key


def role(relative: str) -> str | None:
    """The role of an artifact at ``relative`` (a path below the repository), in either layout; None: not compared."""
    parts = relative.split("/")
    if parts[:2] == ["data", "datasets"]:
        if len(parts) == 3:  # before issue 11: data/datasets/<dataset>.npz, <dataset>-val.npz, manifest.json
            dataset = re.sub(r"(-val)?\.npz$", "", parts[2])
            return None if parts[2] == "manifest.json" else f"dataset {dataset}: {parts[2]}"
        if parts[3] == "manifest.json":
            return None  # the manifest's roles come from its content (manifest_roles)
        return f"dataset {parts[2]}: {parts[3]}"  # data/datasets/<dataset>/<file> (also a 100m folder before)
    if parts[:2] == ["data", "priors"]:
        return f"prior {_dataset_of(parts[2])}: {'/'.join(parts[3:])}"
    if parts[:2] == ["data", "reversed"]:
        return f"reversal {_dataset_of(parts[2])}: {'/'.join(parts[3:])}"
    if parts[:2] == ["data", "runs"] and parts[-1] == "policy.msgpack":
        if len(parts) == 6:  # data/runs/<agent>/<task>/seed<s>/policy.msgpack
            return f"policy {parts[2]} {parts[3]} {parts[4]}"
        if len(parts) == 7:  # data/runs/<agent>/<dataset>/task<k>/seed<s>/policy.msgpack
            return f"policy {parts[2]} {task_name(parts[3], int(parts[4].removeprefix('task')))} {parts[5]}"
    return None


def manifest_roles(manifest: dict) -> dict[str, dict]:
    """A download manifest's content by dataset role: each dataset's entry with the library versions (a manifest
    of before issue 11 held every dataset of the study and a task -> dataset map, which is no dataset's)."""
    return {f"dataset {name}: manifest entry": {"entry": entry, "versions": manifest.get("versions")}
            for name, entry in manifest.get("datasets", {}).items()}


def describe(path: Path) -> dict:
    """sha256 of the file, and the content compared when the bytes differ: a policy's arrays (digest) and metadata,
    a JSON file's keys."""
    data = path.read_bytes()
    found: dict = {"sha256": hashlib.sha256(data).hexdigest()}
    if path.suffix == ".msgpack":
        loaded = decode_policy(data, source=str(path))
        arrays = hashlib.sha256()
        for name, leaf in sorted(leaf_paths(loaded.params), key=lambda item: item[0]):
            arrays.update(json.dumps([list(name), leaf.dtype.str, list(leaf.shape)]).encode() + leaf.tobytes())
        found.update(arrays=arrays.hexdigest(), content={"metadata": loaded.metadata})
    elif path.suffix == ".json":
        found["content"] = json.loads(data)
    return found


def collect(repo: Path) -> dict[str, dict]:
    roles: dict[str, dict] = {}
    paths = sorted({path for pattern in COMPARED for path in repo.glob(pattern)
                    if path.is_file() and not path.name.startswith(".")})  # fmt: skip
    for path in paths:
        relative = path.relative_to(repo).as_posix()
        if relative.startswith("data/datasets/") and path.name == "manifest.json":
            for name, content in manifest_roles(json.loads(path.read_text())).items():
                text = json.dumps(content, sort_keys=True).encode()
                roles[name] = {"sha256": hashlib.sha256(text).hexdigest(), "content": content, "path": relative}
            continue
        name = role(relative)
        if name is None:
            continue
        if name in roles:
            raise SystemExit(f"{relative} and {roles[name]['path']} have the same role {name!r}: a study with "
                             f"several tasks of one dataset kept a prior per task; compare a one-task study")
        roles[name] = {**describe(path), "path": relative}
    return roles


def build(side: str, workdir: Path, study: str) -> dict[str, dict]:
    resolved = side if side == "worktree" else subprocess.run(
        ["git", "rev-parse", side], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    saved = workdir / f"{study}-{resolved}.json"
    if resolved != "worktree" and saved.is_file() and json.loads(saved.read_text()).get("format") == FORMAT:
        print(f"{side}: results from {saved}", flush=True)
        return json.loads(saved.read_text())["roles"]
    repo = workdir / f"{study}-{resolved}"
    shutil.rmtree(repo, ignore_errors=True)
    export(side, repo, study)
    print(f"{side}: dvc repro {' '.join(TRAIN_STAGES)} in {repo}", flush=True)
    dvc("repro", *TRAIN_STAGES, cwd=repo)
    found = collect(repo)
    if resolved != "worktree":
        saved.write_text(json.dumps({"format": FORMAT, "roles": found}, indent=1, sort_keys=True))
    return found


def key_differences(a, b, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON values differ (a list differing anywhere counts at its key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(a.keys() | b.keys(), key=str)
                for d in key_differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if a == b else [prefix or "(value)"]


def compare(baseline: dict[str, dict], candidate: dict[str, dict], allowed: set[str]) -> tuple[list[str], bool]:
    """Lines describing each role, and whether every role matches (bytes, or content up to ``allowed`` keys)."""
    lines, ok = [], True
    for name in sorted(baseline.keys() | candidate.keys()):
        old, new = baseline.get(name), candidate.get(name)
        if old is None or new is None:
            lines.append(f"MISSING {name}: only in the {'candidate' if old is None else 'baseline'}")
            ok = False
        elif old["sha256"] == new["sha256"]:
            lines.append(f"identical {name}")
        elif "content" not in old or "content" not in new or old.get("arrays") != new.get("arrays"):
            lines.append(f"DIFFERS {name}: {'arrays' if 'arrays' in old else 'bytes'} "
                         f"{old.get('arrays', old['sha256'])[:12]} vs {new.get('arrays', new['sha256'])[:12]}")
            ok = False
        else:
            keys = key_differences(old["content"], new["content"])
            unexpected = [key for key in keys if key not in allowed]
            what = "arrays identical, metadata" if "arrays" in old else "JSON"
            lines.append(f"{'DIFFERS' if unexpected else 'content'} {name}: {what} differs at {', '.join(keys)}"
                         + (f" (not allowed: {', '.join(unexpected)})" if unexpected else " (allowed)"))
            ok = ok and not unexpected
    return lines, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--candidate", default="worktree", help="git revision, or `worktree` (default)")
    parser.add_argument("--study", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--allow", action="append", default=[], metavar="KEY",
                        help="a JSON or policy-metadata key allowed to differ (dotted, e.g. metadata.inputs.prior)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/byte-identity"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    baseline = build(args.baseline, args.workdir, args.study)
    candidate = build(args.candidate, args.workdir, args.study)
    lines, ok = compare(baseline, candidate, set(args.allow))
    print("\n".join(lines))
    identical = sum(line.startswith("identical ") for line in lines)
    print(f"{identical} of {len(lines)} roles byte-identical, {sum(l.startswith('content ') for l in lines)} equal "
          f"up to allowed keys ({args.study} study, {args.baseline} vs {args.candidate})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
