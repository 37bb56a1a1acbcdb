"""The RQL pipeline: one module per DVC stage, the pure library in ``stages.core``.

Two checks run before any stage code:
- under ``dvc repro`` (DVC_ROOT set) the process asks the kernel to kill it (SIGKILL) when dvc dies, as early as it
  can, and stops at once if dvc is already gone, so no orphaned stage writes outputs a new ``dvc repro`` checks out.
  SIGKILL, not SIGTERM: a SIGTERM handler runs only between Python bytecodes, and a stage inside a JAX compile or
  an XLA call outlived its dvc by seconds that way; every output is written atomically, so nothing partial remains;
- stage commands run ``python -m stages.<name>`` with whatever ``python`` is first on PATH: when that is not the
  project's environment, say so in one line instead of failing on the first missing import.
"""

import importlib.util as _util
import os as _os
import signal as _signal
import sys as _sys

if _os.environ.get("DVC_ROOT"):
    from stages.core.parent_watch import die_with_parent as _die_with_parent

    if _os.getppid() == 1:  # started by a dvc that already died (its children were handed to init)
        raise SystemExit("error: the dvc process that started this stage is gone; not running")
    _die_with_parent(_signal.SIGKILL)

_missing = [name for name in ("jax", "flax", "orbax", "dvclive", "tqdm", "pydantic") if _util.find_spec(name) is None]
if _missing:
    raise SystemExit(
        f"error: {_sys.executable} is not the project's Python environment (no module {', '.join(_missing)}): "
        "activate it first (`source .venv/bin/activate`, made by `make setup`), or run `make repro`"
    )
