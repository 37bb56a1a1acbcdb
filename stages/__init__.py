"""The RQL pipeline: one module per DVC stage, the pure library in ``stages.core``.

Stage commands run ``python -m stages.<name>`` with whatever ``python`` is first on PATH: when that is not the
project's environment, say so in one line instead of failing on the first missing import.
"""

import importlib.util as _util
import sys as _sys

_missing = [name for name in ("jax", "flax", "orbax", "dvclive", "tqdm", "pydantic") if _util.find_spec(name) is None]
if _missing:
    raise SystemExit(
        f"error: {_sys.executable} is not the project's Python environment (no module {', '.join(_missing)}): "
        "activate it first (`source .venv/bin/activate`, made by `make setup`), or run `make repro`"
    )
