"""Check the DVC cache and the workspace against their hashes: ``python -m stages.verify_cache [--remove]``.

DVC never re-hashes what it checks out, so a cache object damaged on disk (or by a bad copy) reaches the workspace
silently. This re-hashes every object of the cache and every workspace file that dvc.lock records, prints one line
per file whose bytes do not match, and exits 1 if there is any. ``--remove`` deletes the damaged objects and
workspace copies, so that ``dvc pull`` (from the remote) or ``dvc repro`` (by rerunning the stage) brings them back.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from stages import cli
from stages.core import cache_integrity

log = logging.getLogger("stages.verify_cache")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.verify_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", action="store_true", help="delete the damaged objects and workspace files")
    parser.add_argument("--cache-only", action="store_true", help="check the cache objects, not the workspace")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("DVC_ROOT") or ".").resolve()
    if not (root / ".dvc").is_dir():
        raise FileNotFoundError(f"{root} is not a DVC repository (no .dvc folder): run this from the repository")
    problems = cache_integrity.check(root, workspace=not args.cache_only)
    for problem in problems:
        print(f"damaged: {problem.line(root)}")
        if args.remove:
            problem.path.unlink(missing_ok=True)
    if problems:
        fix = "removed; run `dvc pull` or `dvc repro` to restore them" if args.remove else (
            "rerun with --remove, then `dvc pull` or `dvc repro` to restore them")
        named = sorted({user for problem in problems for user in problem.used_by}) or [
            problem.where(root) for problem in problems]
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        raise RuntimeError(f"{len(problems)} damaged file(s) in the DVC cache or workspace, holding "
                           f"{', '.join(named[:3])}{more}: {fix}")
    log.info("the DVC cache and the workspace files of dvc.lock match their hashes")


if __name__ == "__main__":
    cli.run(main)
