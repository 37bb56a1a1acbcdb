"""Byte identity of the pipeline's artifacts between two versions of the code, on the tiny study of the tests.

Runs `dvc repro` of the train stages (download -> prior -> reverse -> train, every agent) with the TINY settings
of tests/test_pipeline.py in a fresh repository per side, then compares the datasets, the priors, the reversal
shards and manifests and the policy exports byte for byte (sha256). A side is a git revision (exported with
`git archive`) or `worktree` (the files git sees in this checkout, uncommitted changes included). A revision's
hashes are kept in the work folder, so a baseline runs once.

    python scripts/byte_identity.py --baseline b502960 --workdir /tmp/byte-identity       # baseline vs worktree
    python scripts/byte_identity.py --baseline b502960 --candidate HEAD --workdir /tmp/byte-identity

Exits 1 when a file differs or is missing on one side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_pipeline import copy_project, dvc, git, run, write_tiny_params

TRAIN_STAGES = ["train_rql", "train_rql_cached", "train_fql", "train_bc_flow"]
COMPARED = ["data/datasets/**/*", "data/priors/**/*", "data/reversed/**/*", "data/runs/*/*/*/policy.msgpack"]


def export(side: str, target: Path) -> None:
    """The code of ``side`` (a revision or ``worktree``) as a new git repository at ``target``."""
    target.mkdir(parents=True)
    if side == "worktree":
        copy_project(target)
    else:
        archive = subprocess.run(["git", "archive", side], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        (target / "dvc.lock").unlink(missing_ok=True)
        for sub in ("data", "reports"):
            shutil.rmtree(target / sub, ignore_errors=True)
    write_tiny_params(target)
    run(["git", "init", "-q"], target)
    git(target, "add", "-A")
    git(target, "commit", "-qm", f"tiny study at {side}")


def hashes(repo: Path) -> dict[str, str]:
    found = sorted(
        {
            path
            for pattern in COMPARED
            for path in repo.glob(pattern)
            if path.is_file() and not path.name.startswith(".")
        }
    )
    return {str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest() for path in found}


def build(side: str, workdir: Path) -> dict[str, str]:
    resolved = (
        side
        if side == "worktree"
        else subprocess.run(
            ["git", "rev-parse", side], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    saved = workdir / f"{resolved}.json"
    if resolved != "worktree" and saved.is_file():
        print(f"{side}: hashes from {saved}", flush=True)
        return json.loads(saved.read_text())
    repo = workdir / resolved
    shutil.rmtree(repo, ignore_errors=True)
    export(side, repo)
    print(f"{side}: dvc repro {' '.join(TRAIN_STAGES)} in {repo}", flush=True)
    dvc("repro", *TRAIN_STAGES, cwd=repo)
    found = hashes(repo)
    if resolved != "worktree":
        saved.write_text(json.dumps(found, indent=1, sort_keys=True))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--candidate", default="worktree", help="git revision, or `worktree` (default)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/byte-identity"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    baseline, candidate = build(args.baseline, args.workdir), build(args.candidate, args.workdir)
    differ = sorted(
        name for name in baseline.keys() | candidate.keys() if baseline.get(name) != candidate.get(name)
    )
    for name in differ:
        print(
            f"DIFFERS {name}: {baseline.get(name, 'missing')[:12]} vs {candidate.get(name, 'missing')[:12]}"
        )
    print(
        f"{len(baseline.keys() & candidate.keys()) - len(set(differ) & baseline.keys() & candidate.keys())} of "
        f"{len(baseline.keys() | candidate.keys())} files byte-identical ({args.baseline} vs {args.candidate})"
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
