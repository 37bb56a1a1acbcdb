"""What every stage's ``main`` shares: logging set-up, device choice, and errors as one clear line + exit code 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("stages")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def select_device(device: str) -> str:
    """Make JAX use ``device`` ('auto' | 'cpu' | 'gpu'); call before any JAX computation. Returns the platform."""
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    platform = jax.default_backend()
    if device == "gpu" and platform not in ("gpu", "cuda", "rocm"):
        raise RuntimeError(
            f"train.device is 'gpu' but JAX found only {platform!r} devices: install the CUDA build "
            "(`make setup EXTRAS=cuda`) or set train.device: auto"
        )
    return platform


def stage_args(module: str, doc: str, argv: list[str], *, per_run: bool):
    """Parse a stage's arguments (``--task``, with ``per_run`` also ``--agent`` and ``--seed``), load the params
    and check that the task (and run) is configured. Returns ``(args, params)``."""
    from stages.params import load_params

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip().split("\n")[0])
    if per_run:
        parser.add_argument("--agent", required=True)
    parser.add_argument("--task", required=True)
    if per_run:
        parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.task not in params.tasks:
        raise ValueError(f"task {args.task!r} is not in params.yaml tasks {params.tasks}")
    if per_run and (args.agent not in params.agents.runs or args.seed not in params.seeds):
        raise ValueError(f"run ({args.agent}, seed {args.seed}) is not in params.yaml "
                         f"(agents {params.agents.runs}, seeds {params.seeds})")
    return args, params


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as sorted, indented JSON atomically (temp file + rename)."""
    from stages.core.checkpoints import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Run a stage's ``main(argv)``; any exception becomes one 'error:' line on stderr and exit code 1."""
    setup_logging()
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except Exception as exc:  # the whole message, not a traceback, is what a user needs
        if os.environ.get("RQL_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1)
