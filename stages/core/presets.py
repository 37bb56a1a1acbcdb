"""The reference implementation's per-environment RQL settings, and the settings of environments it never ran.

`PRESETS` is the reference's command list, as `stages/reference/rql_hyperparameters.csv` records it (a test checks
that the two agree). A dataset whose environment has no entry (e.g. cube-single) gets `DEFAULT_PRESET` (alpha 3.0,
expectile 0.9, rho 0.5, h 5, discount 0.99), whose sparse flag follows the reference's rule by environment family:
sparse rewards for scene and puzzle, dense otherwise. Presets are per environment and dataset type, never per task:
every task of a dataset gets the same settings, so one BC prior and one reversal cache serve all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stages.core.ogbench_names import parse_dataset


@dataclass(frozen=True)
class Preset:
    alpha: float  # BC (flow-matching) weight
    expectile: float  # kappa
    rho: float  # pessimism over the critic ensemble
    h: int  # action chunk length
    discount: float
    sparse: bool  # r <- -1 * [r != 0]


PRESETS: dict[str, Preset] = {
    "scene-play": Preset(alpha=3.0, expectile=0.7, rho=0.5, h=5, discount=0.99, sparse=True),
    "puzzle-3x3-play": Preset(alpha=1.0, expectile=0.7, rho=0.5, h=5, discount=0.99, sparse=True),
    "puzzle-4x4-play": Preset(alpha=1.0, expectile=0.9, rho=0.5, h=5, discount=0.99, sparse=True),
    "cube-double-play": Preset(alpha=10.0, expectile=0.9, rho=0.5, h=5, discount=0.99, sparse=False),
    "cube-triple-play": Preset(alpha=1.0, expectile=0.9, rho=0.5, h=5, discount=0.99, sparse=False),
    "cube-quadruple-play": Preset(alpha=1.0, expectile=0.7, rho=0.5, h=5, discount=0.99, sparse=False),
    "antmaze-large-navigate": Preset(alpha=0.1, expectile=0.5, rho=0.5, h=1, discount=0.99, sparse=False),
    "antmaze-giant-navigate": Preset(alpha=0.1, expectile=0.5, rho=0.5, h=1, discount=0.995, sparse=False),
    "humanoidmaze-medium-navigate": Preset(
        alpha=0.3, expectile=0.5, rho=0.0, h=1, discount=0.995, sparse=False
    ),
    "humanoidmaze-large-navigate": Preset(
        alpha=0.3, expectile=0.5, rho=0.0, h=1, discount=0.995, sparse=False
    ),
}
# Environments the reference never ran (e.g. cube-single): documented defaults; sparse follows the family rule.
DEFAULT_PRESET = Preset(alpha=3.0, expectile=0.9, rho=0.5, h=5, discount=0.99, sparse=False)
PRESET_NAMES = ("auto", "default", *PRESETS)


def preset_for_dataset(dataset: str) -> tuple[str, Preset]:
    """(name, preset) of the dataset's own environment: its `PRESETS` entry, else 'default' with the family sparse
    rule."""
    spec = parse_dataset(dataset)
    if spec.preset_key in PRESETS:
        return spec.preset_key, PRESETS[spec.preset_key]
    return "default", dataclasses.replace(DEFAULT_PRESET, sparse=spec.sparse_family)


def named_preset(name: str) -> tuple[str, Preset]:
    """(name, preset) of a preset named in params (`default` or a `PRESETS` key)."""
    return (name, DEFAULT_PRESET) if name == "default" else (name, PRESETS[name])
