"""The bounds of the settings the params schema and the core's configs share, each written once.

`stages/params.py` turns a bound into its pydantic field constraint (`Bound.field()`: the error names the
params.yaml key); the agent configs of stages/core/agents check the same bound (`Bound.check`), so a config built
by hand (tests, benchmarks) is refused where params.yaml would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """An interval of allowed values: ``gt``/``ge`` below, ``lt``/``le`` above (None: unbounded on that side)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def field(self) -> dict[str, float]:
        """The pydantic ``Field`` constraints."""
        return {key: value for key, value in vars(self).items() if value is not None}

    def contains(self, value: Any) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))  # fmt: skip

    def describe(self) -> str:
        low = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None
        high = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None
        if low and high:
            return f"in {low}, {high}"
        return f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else (
            f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}")  # fmt: skip

    def check(self, name: str, value: Any) -> None:
        """ValueError ``<name> must be <bound>, got <value>`` when ``value`` is outside."""
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")


COUNT = Bound(gt=0)  # h, flow steps, ensemble members, fixed-point iterations
BATCH_SIZE = Bound(ge=2)
LEARNING_RATE = Bound(gt=0)
DISCOUNT = Bound(gt=0, lt=1)
EXPECTILE = Bound(gt=0, lt=1)  # kappa of the expectile loss
PESSIMISM = Bound(ge=0)  # rho: mean - rho * std over the critic ensemble
BC_WEIGHT = Bound(gt=0)  # alpha of RQL (flow matching) and of FQL (distillation)
TARGET_RATE = Bound(gt=0, le=1)  # tau of the Polyak target
EMA = Bound(ge=0, lt=1)  # the evaluated actor's exponential moving average
TOLERANCE = Bound(gt=0)  # the exact reversal's fixed-point tolerance
