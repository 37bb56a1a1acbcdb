"""Rewrite dvc.yaml's code deps of every stage to the stage's import closure (what tests/test_stage_deps.py checks).

Only the `- stages/....py` lines of each stage's `deps:` change (in sorted order); folder deps, data deps, comments
and anchors stay as they are. Run after moving imports: `python scripts/sync_stage_deps.py`, then review the diff.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_stage_deps import code_deps, import_closure, stage_entries

_FILE_DEP = re.compile(r"^      - (stages/\S+\.py)$")


def main() -> int:
    path = ROOT / "dvc.yaml"
    wanted = {}
    for name, module, deps in stage_entries():
        folders = code_deps([d for d in deps if not d.endswith(".py")])
        wanted[name] = sorted(str(p.relative_to(ROOT)) for p in import_closure(module) - folders)
    out, stage, written = [], None, set()
    for line in path.read_text().splitlines():
        if (match := re.match(r"^  ([\w-]+):$", line)) is not None:
            stage = match[1]
        if stage in wanted and _FILE_DEP.match(line):
            if stage not in written:  # the stage's first file dep: all of them, in order
                out.extend(f"      - {name}" for name in wanted[stage])
                written.add(stage)
            continue
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    print(
        f"{len(written)} stages' code deps written; stages without a file dep to anchor on: "
        f"{sorted(set(wanted) - written) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
