"""OGBench's names: tasks, datasets, environments, and the rules that follow from an environment family.

A study names datasets (`cube-single-play-v0`) and task numbers (2); `task_name` is the one place that joins them
into OGBench's singletask name `<family>-<dataset type>[-100m]-singletask-task<k>-v0`, e.g.
`cube-single-play-singletask-task2-v0`: it trains on the dataset `cube-single-play-v0` and is evaluated in the
environment `cube-single-singletask-task2-v0`. `puzzle-4x4-play-100m-singletask-task1-v0` trains on
`puzzle-4x4-play-100m-v0`, a folder of 1M-transition files `puzzle-4x4-play-v0-000.npz`, ...

The family decides the rest: which dataset types OGBench publishes, whether the dataset was collected by trained
expert policies (only downloadable), whether the raw files carry button states, and the reference's sparse-reward
rule. The paper's tables name environments the short way (`cube-double`, `scene`, `puzzle-4x4-100m`): see
`environment`. Everything here is pure string handling except `parse_task`, `check_dataset`, `task_numbers` and
`resolve_env_id`, which check names against the gymnasium ids OGBench registers.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from functools import cache

MANIPULATION_TYPES = ("play", "noisy")
# Environment family -> dataset types OGBench publishes for it (the first: the family's default one).
DATASET_TYPES: dict[str, tuple[str, ...]] = {
    **{f"cube-{n}": MANIPULATION_TYPES for n in ("single", "double", "triple", "quadruple")},
    "scene": MANIPULATION_TYPES,
    **{f"puzzle-{n}": MANIPULATION_TYPES for n in ("3x3", "4x4", "4x5", "4x6")},
    **{f"pointmaze-{n}": ("navigate", "stitch") for n in ("medium", "large", "giant", "teleport")},
    **{f"antmaze-{n}": ("navigate", "stitch", "explore") for n in ("medium", "large", "teleport")},
    "antmaze-giant": ("navigate", "stitch"),
    **{f"humanoidmaze-{n}": ("navigate", "stitch") for n in ("medium", "large", "giant")},
    **{f"antsoccer-{n}": ("navigate", "stitch") for n in ("arena", "medium")},
}
LARGE_SIZES = ("100m",)  # OGBench's large datasets: a folder of 100 files of 1M transitions each
EXPERT_FAMILIES = ("antmaze-", "humanoidmaze-", "antsoccer-")  # datasets collected by trained expert policies
BUTTON_FAMILIES = ("scene", "puzzle-")  # raw files carry button_states; the reference uses sparse rewards

_FAMILY = r"(?P<family>[a-z0-9]+(?:-[a-z0-9]+)*?)-(?P<dataset_type>play|noisy|navigate|stitch|explore)"
_DATASET_RE = re.compile(rf"^{_FAMILY}(?:-(?P<size>[0-9]+[a-z]))?-(?P<version>v[0-9]+)$")
_TASK_RE = re.compile(
    rf"^{_FAMILY}(?:-(?P<size>[0-9]+[a-z]))?-singletask(?:-task(?P<task_id>[0-9]+))?-(?P<version>v[0-9]+)$"
)
_TASK_FORM = "<env>-<dataset type>[-100m]-singletask[-task<k>]-v0, e.g. cube-single-play-singletask-task2-v0"
_DATASET_FORM = "<env>-<type>[-100m]-v0, e.g. cube-single-play-v0"


@dataclass(frozen=True)
class DatasetSpec:
    """The parts of an OGBench dataset name, and what its family implies."""

    family: str  # e.g. 'cube-single', 'puzzle-4x4', 'pointmaze-medium'
    dataset_type: str  # play | noisy | navigate | stitch | explore
    size: str | None  # None (1M transitions) or '100m'
    version: str

    @property
    def dataset(self) -> str:
        """OGBench dataset name: `<family>-<type>[-100m]-v0` (a file, or a folder of files when large)."""
        return f"{self.family}-{self.dataset_type}{f'-{self.size}' if self.size else ''}-{self.version}"

    @property
    def shard_stem(self) -> str:
        """Name stem of the files inside a large dataset's folder: `<stem>-000.npz`, `<stem>-000-val.npz`, ..."""
        return f"{self.family}-{self.dataset_type}-{self.version}"

    @property
    def is_large(self) -> bool:
        return self.size is not None

    @property
    def kind(self) -> str:
        """`cube`, `scene`, `puzzle`, `pointmaze`, `antmaze`, ...: the family without its size."""
        return self.family.split("-")[0]

    @property
    def is_manipulation(self) -> bool:
        return self.kind in ("cube", "scene", "puzzle")

    @property
    def needs_expert_weights(self) -> bool:
        """True when OGBench built the dataset with trained expert policies (only downloadable)."""
        return self.family.startswith(EXPERT_FAMILIES)

    @property
    def has_buttons(self) -> bool:
        return self.family.startswith(BUTTON_FAMILIES)

    @property
    def sparse_family(self) -> bool:
        """The reference's sparse-reward rule: scene and puzzle."""
        return self.family.startswith(BUTTON_FAMILIES)

    @property
    def default_env(self) -> str:
        """Registered gymnasium id of the environment's default singletask env, e.g. `cube-single-singletask-v0`:
        its spaces are those of every task of the dataset (what checking a dataset file without a task needs)."""
        return f"{self.family}-singletask-{self.version}"

    @property
    def preset_key(self) -> str:
        """The environment's key among the reference's per-environment settings, e.g. 'cube-double-play'."""
        return f"{self.family}-{self.dataset_type}"

    @property
    def environment(self) -> str:
        """The environment as the paper's per-environment tables name it: the family (`cube-single`, `scene`),
        qualified by the dataset type when it is not the family's default one (`cube-single-noisy`,
        `antmaze-large-stitch`) and by the size (`puzzle-4x4-100m`), so that different datasets never share a mean."""
        name = self.family
        if self.family in DATASET_TYPES and self.dataset_type != DATASET_TYPES[self.family][0]:
            name += f"-{self.dataset_type}"
        return name + (f"-{self.size}" if self.size else "")


@dataclass(frozen=True)
class TaskSpec(DatasetSpec):
    """The parts of an OGBench singletask name."""

    task: str
    task_id: int | None  # None: the environment's default task

    @property
    def env(self) -> str:
        """Registered gymnasium id of the singletask environment (the dataset type and size removed)."""
        task = f"-task{self.task_id}" if self.task_id is not None else ""
        return f"{self.family}-singletask{task}-{self.version}"

    @property
    def key(self) -> str:
        """A short, stable key: `cube-single-play-singletask-task2-v0` -> `cube-single-play-task2`."""
        return self.task.replace("-singletask", "").removesuffix("-v0")


def parse_dataset(dataset: str) -> DatasetSpec:
    """The parts of a dataset name (its form only); ValueError when it is not `<env>-<type>[-100m]-v0`."""
    match = _DATASET_RE.match(dataset) if isinstance(dataset, str) else None
    if match is None:
        raise ValueError(f"{dataset}: not an OGBench dataset name ({_DATASET_FORM})")
    return DatasetSpec(match["family"], match["dataset_type"], match["size"], match["version"])


def _check_parts(name: str, family: str, dataset_type: str, size: str | None) -> None:
    """The family, dataset type and size of a task or dataset name against what OGBench publishes."""
    if family.startswith("visual-"):
        raise ValueError(f"{name!r}: pixel-based (visual-*) tasks are not supported by this pipeline")
    if family not in DATASET_TYPES:
        raise ValueError(
            f"{name!r}: unknown OGBench environment {family!r} (known: {', '.join(DATASET_TYPES)})"
        )
    if dataset_type not in DATASET_TYPES[family]:
        allowed = ", ".join(DATASET_TYPES[family])
        raise ValueError(
            f"{name!r}: OGBench has no {dataset_type!r} dataset for {family} (it has: {allowed})"
        )
    if size is not None and size not in LARGE_SIZES:
        raise ValueError(
            f"{name!r}: unknown dataset size {size!r} (OGBench large datasets: {', '.join(LARGE_SIZES)})"
        )
    if size is not None and dataset_type not in MANIPULATION_TYPES:
        raise ValueError(
            f"{name!r}: OGBench has {size} datasets only for manipulation (play/noisy) environments"
        )


def split_task(task: str) -> TaskSpec:
    """The parts of a task name, checked against OGBench's families, dataset types and sizes (not its registry)."""
    if not isinstance(task, str):
        raise TypeError(f"a task name must be a string (got {task!r})")
    match = _TASK_RE.match(task)
    if match is None:
        raise ValueError(f"not an OGBench singletask name {task!r}: expected {_TASK_FORM}")
    _check_parts(task, match["family"], match["dataset_type"], match["size"])
    task_id = int(match["task_id"]) if match["task_id"] is not None else None
    return TaskSpec(match["family"], match["dataset_type"], match["size"], match["version"], task=task,
                    task_id=task_id)


@cache
def check_dataset(dataset: str) -> DatasetSpec:
    """Parse and check an OGBench dataset name (form, family, type, size, and that OGBench registers singletask
    envs for it); ValueError with the reason when it is not one."""
    spec = parse_dataset(dataset)
    _check_parts(dataset, spec.family, spec.dataset_type, spec.size)
    if not task_numbers(dataset):
        raise ValueError(f"{dataset!r}: OGBench registers no singletask environment {spec.family}-singletask-task<k>")
    return spec


@cache
def task_numbers(dataset: str) -> tuple[int, ...]:
    """The singletask numbers OGBench registers for a dataset's environment, in order (1..5 for every family)."""
    spec = parse_dataset(dataset)
    pattern = re.compile(rf"^{re.escape(spec.family)}-singletask-task([0-9]+)-{re.escape(spec.version)}$")
    return tuple(sorted(int(m[1]) for env in registered_env_ids() if (m := pattern.match(env))))


def task_name(dataset: str, task: int) -> str:
    """OGBench's singletask name of task number ``task`` of ``dataset`` (the one place that builds it):
    (`cube-single-play-v0`, 2) -> `cube-single-play-singletask-task2-v0`; (`puzzle-4x4-play-100m-v0`, 1) ->
    `puzzle-4x4-play-100m-singletask-task1-v0`. Form only: `check_dataset` and `task_numbers` check existence."""
    spec = parse_dataset(dataset)
    size = f"-{spec.size}" if spec.size else ""
    return f"{spec.family}-{spec.dataset_type}{size}-singletask-task{int(task)}-{spec.version}"


@cache
def registered_env_ids() -> frozenset[str]:
    """The gymnasium ids OGBench registers (importing ogbench; rendering defaults to headless EGL)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    import gymnasium
    import ogbench  # noqa: F401  (registers OGBench's environments)

    return frozenset(gymnasium.envs.registry)


@cache
def parse_task(task: str) -> TaskSpec:
    """Parse and check an OGBench singletask name; ValueError with the reason when it is not one."""
    spec = split_task(task)
    if spec.env not in registered_env_ids():
        raise ValueError(
            f"{task!r}: OGBench registers no environment {spec.env!r} (singletask ids are task1..task5)"
        )
    return spec


def dataset_for_task(task: str) -> str:
    """OGBench dataset a task trains on: `cube-single-play-singletask-task2-v0` -> `cube-single-play-v0`."""
    return parse_task(task).dataset


def env_for_task(task: str) -> str:
    """Singletask environment of a task: `cube-single-play-singletask-task2-v0` -> `cube-single-singletask-task2-v0`."""
    return parse_task(task).env


def environment(task: str) -> str:
    """The environment a task belongs to, named as the paper's per-environment tables do (`DatasetSpec.environment`)."""
    return parse_task(task).environment


def large_dataset_stem(dataset: str) -> str | None:
    """`puzzle-4x4-play-100m-v0` -> `puzzle-4x4-play-v0` (the name stem of its files); None for a 1M dataset."""
    try:
        spec = parse_dataset(dataset)
    except ValueError:
        return None
    return spec.shard_stem if spec.is_large else None


def shard_file_names(stem: str, index: int) -> tuple[str, str]:
    """(train, val) file names of one file of a large dataset, as OGBench's server names them."""
    return f"{stem}-{index:03d}.npz", f"{stem}-{index:03d}-val.npz"


def resolve_env_id(name: str) -> str:
    """The gymnasium id for an OGBench env id (`cube-single-singletask-task2-v0`) or a task name
    (`cube-single-play-singletask-task2-v0`, mapped as OGBench's `make_env_and_datasets` does).

    Raises:
        ValueError: the name is neither, with the closest registered ids.
    """
    registry = registered_env_ids()
    if name in registry:
        return name
    try:
        env = split_task(name).env
    except (TypeError, ValueError):
        env = None
    if env in registry:
        return env
    close = difflib.get_close_matches(name, [k for k in registry if "singletask" in k], n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(
        f"unknown OGBench environment {name!r}: expected an env id such as 'cube-single-singletask-task2-v0' or a "
        f"task name such as 'cube-single-play-singletask-task2-v0'{hint}"
    )
