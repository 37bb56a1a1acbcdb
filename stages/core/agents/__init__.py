"""Flow agents, one per module, with one interface: Config, TrainState, init, make_update, policy_params,
sample_actions. Which runs use which agent: stages/agent_registry.py."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

LOADS_ITS_MODULES = True  # for tests/test_stage_deps.py: importing this package loads any module in it


def load(algorithm: str) -> ModuleType:
    """The agent module ``stages.core.agents.<algorithm>``."""
    if not isinstance(algorithm, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", algorithm) or algorithm == "common":
        raise ValueError(f"not an agent module name: {algorithm!r}")
    return importlib.import_module(f"{__name__}.{algorithm}")
