"""The project's XLA settings, added to XLA_FLAGS before JAX creates its CPU backend.

Imported by the stages.core package itself, so every stage, test and benchmark that uses the core gets them as
long as no JAX computation ran before that import (a warning says so otherwise). A flag the user already set in
XLA_FLAGS, to any value, is left alone.

* ``--xla_cpu_copy_insertion_use_region_analysis=true``: the jitted K-update loop carries the whole training
  state; without the finer analysis XLA copies parameter-sized loop buffers at every update (six 10 MB copies
  per update at the paper's critic size) because it cannot prove that the Polyak blend and the forward passes read
  the old parameters before Adam overwrites them. Results are bit-identical (the default pipeline's policies
  come out byte for byte the same); the paper-size RQL update gets faster, the default sizes do not change
  (benchmarks/update_speed.py; the figures: README, "Benchmarks").
"""

from __future__ import annotations

import os
import sys
import warnings

FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def apply(environ=os.environ) -> str:
    """Add the missing FLAGS to environ['XLA_FLAGS']; return the resulting value."""
    current = environ.get("XLA_FLAGS", "")
    present = {_flag_name(f) for f in current.split()}
    missing = [f for f in FLAGS if _flag_name(f) not in present]
    if missing:
        environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
        if environ is not os.environ:
            return environ["XLA_FLAGS"]
        # flags set after the backend exists do nothing: say so. Only look if JAX is already imported (importing
        # it here would delay every stage before it can start its worker processes).
        xla_bridge = sys.modules.get("jax._src.xla_bridge")
        started = getattr(xla_bridge, "backends_are_initialized", None)
        if started is not None and started():
            warnings.warn(
                f"JAX's backend started before stages.core.xla_setup; {missing} not applied",
                RuntimeWarning,
                stacklevel=2,
            )
    return environ.get("XLA_FLAGS", "")


apply()
