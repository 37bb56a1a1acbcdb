"""What every stage's ``main`` shares: logging set-up, device choice, and errors as one clear line + exit code 1.

Importing this module applies the project's XLA flags (stages.core.xla_setup) before anything can start JAX, so
every stage runs with them. :func:`select_device` also turns on JAX's persistent compilation cache, so the train
stages of a study (which compile the same update) and the evaluate stages compile once per machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from stages.core import xla_setup  # noqa: F401  (before JAX starts: its flags only act on a new backend)
from stages.core.files import write_json  # noqa: F401  (stages write their JSON outputs as cli.write_json)

log = logging.getLogger("stages")
COMPILATION_CACHE_ENV = "RQL_JAX_CACHE"  # a folder, or "off"; default: .cache/jax in the repository
COMPILATION_CACHE_MIN_SECONDS = 0.2  # compilations faster than this are not worth a cache entry


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "matplotlib", "OpenGL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def select_device(device: str) -> str:
    """Make JAX use ``device`` ('auto' | 'cpu' | 'gpu'); call before any JAX computation. Returns the platform."""
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    enable_compilation_cache(jax)
    platform = jax.default_backend()
    if device == "gpu" and platform not in ("gpu", "cuda", "rocm"):
        raise RuntimeError(
            f"train.device is 'gpu' but JAX found only {platform!r} devices: install the CUDA build "
            "(`make setup EXTRAS=cuda`) or set train.device: auto"
        )
    return platform


def compilation_cache_dir(environ=os.environ) -> Path | None:
    """Where JAX keeps compiled programs across processes: $RQL_JAX_CACHE ("off": nowhere), else .cache/jax in
    the repository (DVC runs every stage from the repository root and sets DVC_ROOT)."""
    setting = environ.get(COMPILATION_CACHE_ENV, "")
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting).absolute()
    return Path(environ.get("DVC_ROOT") or ".").absolute() / ".cache" / "jax"


def enable_compilation_cache(jax) -> None:
    """Turn on JAX's persistent compilation cache (compiled programs are keyed by program, flags and versions, so
    results are the same with or without it)."""
    folder = compilation_cache_dir()
    if folder is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILATION_CACHE_MIN_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def check_dataset_arg(dataset: str, params) -> None:
    """A stage's ``--dataset`` must be one of params.yaml's datasets."""
    if dataset not in params.datasets:
        raise ValueError(f"dataset {dataset!r} is not in params.yaml datasets {params.datasets}")


def stage_args(module: str, doc: str, argv: list[str], *, per_run: bool):
    """Parse a stage's arguments (``--dataset``, with ``per_run`` also ``--agent``, ``--task`` (a task number) and
    ``--seed``), load the params and check that the dataset (and run) is configured. Returns ``(args, params)``;
    per run, ``args.task_name`` is the task's OGBench singletask name."""
    from stages.core.ogbench_names import task_name
    from stages.params import load_params

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip().split("\n")[0])
    if per_run:
        parser.add_argument("--agent", required=True)
    parser.add_argument("--dataset", required=True)
    if per_run:
        parser.add_argument("--task", required=True, type=int, help="a task number of params.yaml's tasks")
        parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    check_dataset_arg(args.dataset, params)
    if per_run:
        if args.agent not in params.agents.runs or args.task not in params.tasks or args.seed not in params.seeds:
            raise ValueError(f"run ({args.agent}, task {args.task}, seed {args.seed}) is not in params.yaml "
                             f"(agents {params.agents.runs}, tasks {params.tasks}, seeds {params.seeds})")
        args.task_name = task_name(args.dataset, args.task)
    return args, params


def error_line(exc: BaseException) -> str:
    """``error: <Type>: <message>`` on one line (a multi-line message, e.g. every bad key of params.yaml, joined),
    so the last line a stage prints names the file or key and the problem."""
    message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return f"error: {type(exc).__name__}: {message}"


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler stopping the stage, `kill`): unwind so temporaries are removed."""


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def handle_sigterm() -> None:
    """SIGTERM (a scheduler's stop, ``kill``) unwinds the stage like Ctrl-C. (Under ``dvc`` the kernel kills the stage
    when dvc dies: requested when the ``stages`` package is imported, see stages/__init__.py.)"""
    signal.signal(signal.SIGTERM, _terminate)


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Run a stage's ``main(argv)``; any exception becomes one 'error:' line on stderr and exit code 1.

    Under ``dvc repro`` (DVC_ROOT set) the stage is killed when ``dvc`` dies, so no orphan keeps writing outputs
    that a new ``dvc repro`` checks out; SIGTERM unwinds like Ctrl-C (temporary files are removed, exit 143).
    """
    setup_logging()
    os.environ.setdefault("MUJOCO_GL", "egl")
    handle_sigterm()
    try:
        main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        raise SystemExit(143)
    except Exception as exc:  # the whole message, not a traceback, is what a user needs
        if os.environ.get("RQL_TRACEBACK"):
            raise
        print(error_line(exc), file=sys.stderr)
        raise SystemExit(1)
