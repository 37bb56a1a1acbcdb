"""The hardening campaign: attack the pipeline systematically and print the tally.

    .venv/bin/python benchmarks/hardening.py [--trials 10] [--only kill|cluster-kill|bad-inputs|fuzz] [--workdir DIR]
                                             [--fuzz-cases 2000] [--match TEXT] [--markdown FILE]

- kill: SIGKILL at random points of every stage (download, prior, reverse, train, evaluate, report) of a tiny study,
  outputs checked before any rerun (absent, or complete and valid), then rerun and compared byte for byte with the
  uninterrupted run; and ``dvc repro`` itself killed (no stage may outlive it);
- cluster-kill: the cluster entry point (``python -m stages.cluster_repro``, local Ray instance) SIGKILLed at random
  points: nothing may outlive it or look finished while partial, and a rerun must restore every stage that had
  finished and end byte-identical to the reference (``benchmarks/hardening/cluster_kills.py``);
- bad-inputs: broken params, datasets, shards, policies, checkpoints, DVC cache and remote objects, a full disk and
  two concurrent ``dvc repro``, each through the real entry point (non-zero exit, one ``error:`` line naming the
  file or key, no partial output);
- fuzz: thousands of mutations of valid small files against every loader of shared artifacts.

Everything runs in a temporary directory (``--workdir``, default a new one under $TMPDIR, deleted at the end unless
given); the project itself is only read. The tiny study is built once with ``dvc repro`` (~5 min on 2 cores).
Prints the table and writes it as Markdown (``--markdown``, default ``<workdir>/hardening.md``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hardening import bad_inputs, cluster_kills, fuzz, kills, report
from benchmarks.hardening.common import Result, build_reference

FUZZ_SHARE = {"npz-validate": 1.0, "npz-read": 0.5, "npz-training": 0.5, "shards-read": 1.0, "shards-iter": 0.5,
              "shards-verify": 0.5, "policy-load": 1.0, "policy-decode": 0.5}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fuzz_campaign(cases: int, seed: int, workdir: Path) -> list[Result]:
    results = []
    for target, share in FUZZ_SHARE.items():
        count = max(1, int(cases * share))
        outcomes = fuzz.fuzz_target(target, count, seed=seed, workdir=workdir / f"fuzz-{target}")
        failed = [o for o in outcomes if not o.ok]
        log(f"fuzz {target}: {count} cases, {len(failed)} failures")
        results += [Result(f"fuzz {target}", f"#{o.index} {o.mutation}", o.ok, o.detail) for o in outcomes]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="kill trials per stage")
    parser.add_argument("--only", choices=["kill", "cluster-kill", "bad-inputs", "fuzz"])
    parser.add_argument("--workdir", type=Path, help="keep the study and results here (reused when rerun)")
    parser.add_argument("--fuzz-cases", type=int, default=2000, help="mutations per main loader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--match", help="only the bad inputs / killed stages whose name contains this")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ["JAX_PLATFORMS"] = "cpu"
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="hardening-")) if owned else args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    started = time.monotonic()
    try:
        if args.only in (None, "fuzz"):
            results += fuzz_campaign(args.fuzz_cases, args.seed, workdir)
        if args.only in (None, "kill", "cluster-kill", "bad-inputs"):
            reference = build_reference(workdir, log)
            if args.only in (None, "bad-inputs"):
                results += bad_inputs.campaign(reference, workdir, log, args.match)
            if args.only in (None, "kill"):
                results += kills.campaign(reference, workdir, args.trials, args.seed, log, args.match)
            if args.only in (None, "cluster-kill"):
                results += cluster_kills.campaign(reference, workdir, args.trials, args.seed, log)
    except KeyboardInterrupt:
        log("interrupted: the table covers the cases run so far")
    finally:
        # fuzz results are summarised per loader; their failures stay one line each
        text = report.as_text(_summarised(results))
        print(text)
        header = (f"Hardening campaign ({time.strftime('%Y-%m-%d')}, {time.monotonic() - started:.0f} s, "
                  f"`benchmarks/hardening.py --trials {args.trials} --fuzz-cases {args.fuzz_cases}`)")
        markdown = args.markdown or (Path(tempfile.gettempdir()) / "hardening.md" if owned else workdir / "hardening.md")
        markdown.write_text(report.as_markdown(_summarised(results), header))
        log(f"table written to {markdown}")
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if all(r.ok for r in results) else 1)


def _summarised(results: list[Result]) -> list[Result]:
    """Fuzz outcomes collapse into one category 'fuzz' (cases tried/passed stay exact)."""
    return [Result("fuzz" if r.category.startswith("fuzz ") else r.category,
                   f"{r.category[5:]} {r.name}" if r.category.startswith("fuzz ") else r.name, r.ok, r.detail)
            for r in results]


if __name__ == "__main__":
    main()
