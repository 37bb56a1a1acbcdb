"""The params.yaml schema (pydantic) and the settings it resolves to per dataset.

A study is `datasets` (OGBench dataset names) x `tasks` (singletask numbers): every number on every dataset
(`Params.study_tasks`). `load_params()` validates the whole file before any work starts: unknown keys, unknown
datasets, task numbers a dataset does not have (`stages.core.ogbench_names`), duplicates, zero or negative sizes and
inconsistent settings raise one `ParamsError` whose message names every offending key and value. `resolve_agent`
merges the explicit `agent` values over the dataset's per-environment preset (`stages.core.presets`); presets are
per dataset, so every task of a dataset resolves to the same settings, and its one BC prior and reversal cache
(built with those settings) serve all of its tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from stages.agent_registry import AGENTS, groups
from stages.core import bounds
from stages.core.ogbench_names import check_dataset, parse_dataset, task_name, task_numbers
from stages.core.presets import PRESET_NAMES, named_preset, preset_for_dataset
from stages.core.schedule import schedule_problems


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid. The message names each offending key (stages: one error line)."""


# ---------------------------------------------------------------------------------------------------------------------
# The params.yaml schema
# ---------------------------------------------------------------------------------------------------------------------


def _yaml_number(value: Any) -> Any:
    """Accept YAML 1.1 strings like '1e-4' (PyYAML reads them as str) as numbers; leave everything else alone."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _int(**bounds: Any) -> Any:
    return Annotated[int, Strict(), Field(**bounds)]


def _float(**bounds: Any) -> Any:
    return Annotated[float, BeforeValidator(_yaml_number), Strict(), Field(**bounds)]


PositiveInt = _int(gt=0)
NonNegativeInt = _int(ge=0)
PositiveFloat = _float(gt=0)
Bool = Annotated[bool, Strict()]


def _auto_or_bool(value: Any) -> Any:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"must be auto, true or false (got {value!r})")


AutoOrBool = Annotated[Literal["auto"] | bool, BeforeValidator(_auto_or_bool)]


def _check_dataset_name(dataset: str) -> str:
    check_dataset(dataset)  # ValueError -> reported at datasets[i]
    return dataset


def _check_preset_name(name: str) -> str:
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r} (allowed: {', '.join(PRESET_NAMES)})")
    return name


def _unique(values: list) -> list:
    seen = set()
    repeated = [v for v in values if v in seen or seen.add(v)]
    if repeated:
        raise ValueError(f"duplicate entries: {', '.join(map(str, dict.fromkeys(repeated)))}")
    return values


DatasetName = Annotated[str, Strict(), AfterValidator(_check_dataset_name)]
LayerSizes = Annotated[list[PositiveInt], Field(min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """`download` stage: where datasets come from and how generated ones are sized."""

    source: Literal["auto", "download", "generate"]
    # None: OGBench's published dataset (downloaded; offline, generated at OGBench's size). A number: a dataset
    # generated with that many training episodes (per file for 100m datasets), never a download.
    episodes: PositiveInt | None
    val_episodes: PositiveInt | None  # None: max(1, episodes // 10)
    workers: PositiveInt  # generation processes
    seed: NonNegativeInt
    sparse: AutoOrBool  # auto: the dataset's environment preset
    episode_steps: _int(ge=2) | None = (
        None  # None: OGBench's length (1001 for manipulation and pointmaze navigate)
    )
    shards: _int(ge=1, le=100) = 100  # 100m datasets only: 1M-transition files to download or generate

    @property
    def wants_download(self) -> bool:
        """Whether the datasets are OGBench's published ones (downloaded) rather than generated here."""
        return self.source == "download" or (self.source == "auto" and self.episodes is None)

    def episode_counts(self, ogbench_episodes: int) -> tuple[int, int]:
        """(train, val) episodes of a generated dataset whose OGBench original has ``ogbench_episodes``."""
        episodes = self.episodes if self.episodes is not None else ogbench_episodes
        return episodes, self.val_episodes if self.val_episodes is not None else max(1, episodes // 10)


class FlowParams(_Section):
    steps: _int(**bounds.COUNT.field())


class NetworkParams(_Section):
    actor: LayerSizes
    critic: LayerSizes
    ensemble: _int(**bounds.COUNT.field())
    critic_layer_norm: Bool
    actor_layer_norm: Bool


class _AgentsGroups(_Section):
    @property
    def runs(self) -> list[str]:
        """Every run name, in the order of the groups."""
        return [name for group in type(self).model_fields for name in getattr(self, group)]

    @model_validator(mode="after")
    def _at_least_one(self) -> _AgentsGroups:
        if not self.runs:
            raise ValueError("no agent to train: every group is empty")
        return self


# What trains on every dataset x task x seed, by pipeline stage: one list per group of stages.agent_registry, each holding
# some of the group's run names ([] skips the group), so that each stage declares exactly the params it reads.
AgentsParams = create_model(
    "AgentsParams",
    __base__=_AgentsGroups,
    **{group: (Annotated[list[Literal[names]], AfterValidator(_unique)], ...) for group, names in groups().items()},
)


class AgentParams(_Section):
    preset: Annotated[str, Strict(), AfterValidator(_check_preset_name)]
    # Bounds shared with the agent configs (stages.core.bounds); null: the dataset's preset value
    alpha: _float(**bounds.BC_WEIGHT.field()) | None
    expectile: _float(**bounds.EXPECTILE.field()) | None
    rho: _float(**bounds.PESSIMISM.field()) | None
    h: _int(**bounds.COUNT.field()) | None
    discount: _float(**bounds.DISCOUNT.field()) | None
    lr: _float(**bounds.LEARNING_RATE.field())
    batch_size: _int(**bounds.BATCH_SIZE.field())
    tau: _float(**bounds.TARGET_RATE.field())
    ema: _float(**bounds.EMA.field())
    reversal_method: Literal["euler", "exact"]  # RQL's online reversal of each batch


class FqlParams(_Section):
    alpha: _float(**bounds.BC_WEIGHT.field())


class PriorParams(_Section):
    steps: PositiveInt


class ReverseParams(_Section):
    method: Literal["exact", "euler"]
    iterations: _int(**bounds.COUNT.field())
    tolerance: _float(**bounds.TOLERANCE.field())
    batch_size: PositiveInt
    shard_rows: PositiveInt


class TrainParams(_Section):
    steps: PositiveInt
    refresh_every: NonNegativeInt
    updates_per_call: PositiveInt
    log_every: PositiveInt
    checkpoint_every: PositiveInt
    eval_every: NonNegativeInt
    eval_episodes: PositiveInt
    dataset_swap_every: PositiveInt  # multi-file (100M) datasets: the next 1M-transition file every N steps
    device: Literal["auto", "cpu", "gpu"]


class EvaluateParams(_Section):
    episodes: PositiveInt
    envs: PositiveInt
    workers: PositiveInt
    video: Bool


AutoOrPositiveInt = Annotated[Literal["auto"] | PositiveInt, Field(union_mode="left_to_right")]


class ClusterParams(_Section):
    """`python -m stages.cluster_repro` (the pipeline on Ray): what each stage's Ray task asks for. Read by no stage."""

    gpus: PositiveFloat  # GPU share of each prior/reverse/train task where the cluster has GPUs (0.25: 4 per GPU)
    cpus: PositiveInt  # CPUs of each task of the other stages (and of prior/reverse/train)
    download_cpus: AutoOrPositiveInt  # auto: data.workers
    evaluate_cpus: AutoOrPositiveInt  # auto: evaluate.workers
    retries: NonNegativeInt  # retries of a task whose process or node died (a stage that fails is not retried)


class StudyTask(NamedTuple):
    """One task of the study: task number ``number`` of ``dataset``."""

    dataset: str
    number: int

    @property
    def name(self) -> str:
        """OGBench's singletask name, e.g. `cube-single-play-singletask-task2-v0`."""
        return task_name(self.dataset, self.number)


class Params(_Section):
    """The whole params.yaml."""

    datasets: Annotated[list[DatasetName], Field(min_length=1)]  # OGBench dataset names, e.g. cube-single-play-v0
    tasks: Annotated[list[_int(ge=1)], Field(min_length=1)]  # singletask numbers, on every dataset
    seeds: Annotated[list[NonNegativeInt], Field(min_length=1)]
    agents: AgentsParams
    data: DataParams
    flow: FlowParams
    networks: NetworkParams
    agent: AgentParams
    fql: FqlParams
    prior: PriorParams
    reverse: ReverseParams
    train: TrainParams
    evaluate: EvaluateParams
    cluster: ClusterParams

    _no_duplicates = field_validator("datasets", "tasks", "seeds")(_unique)

    @property
    def study_tasks(self) -> list[StudyTask]:
        """Every task of the study: each dataset with each task number, dataset by dataset."""
        return [StudyTask(dataset, number) for dataset in self.datasets for number in self.tasks]


# ---------------------------------------------------------------------------------------------------------------------
# Resolution of effective settings
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedAgent:
    """Effective agent settings for the tasks of one dataset: explicit `agent` values over the preset's."""

    preset: str
    alpha: float
    expectile: float
    rho: float
    h: int
    discount: float
    lr: float
    batch_size: int
    tau: float
    ema: float
    sparse: bool  # effective data.sparse for this dataset's tasks


def resolve_sparse(params: Params, dataset: str) -> bool:
    """`data.sparse` for the tasks of a dataset: explicit true/false, or (auto) its environment preset's flag."""
    if isinstance(params.data.sparse, bool):
        return params.data.sparse
    return preset_for_dataset(dataset)[1].sparse


def resolve_agent(params: Params, dataset: str) -> ResolvedAgent:
    """Effective agent settings for the tasks of `dataset` (the same for all of them: presets are per environment).
    `agent.preset: auto` uses the dataset's environment preset, a named preset is used for every dataset; `null`
    values in `agent` come from the preset, explicit values override."""
    agent = params.agent
    name, preset = preset_for_dataset(dataset) if agent.preset == "auto" else named_preset(agent.preset)

    def pick(field: str) -> Any:
        value = getattr(agent, field)
        return getattr(preset, field) if value is None else value

    return ResolvedAgent(
        preset=name,
        alpha=float(pick("alpha")),
        expectile=float(pick("expectile")),
        rho=float(pick("rho")),
        h=int(pick("h")),
        discount=float(pick("discount")),
        lr=agent.lr,
        batch_size=agent.batch_size,
        tau=agent.tau,
        ema=agent.ema,
        sparse=resolve_sparse(params, dataset),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Cross-setting consistency
# ---------------------------------------------------------------------------------------------------------------------


_TRAIN_KEYS = {"total_steps": "steps", "swap_every": "dataset_swap_every"}  # Schedule field -> train.<key>


def _schedule_errors(params: Params, refresh_every: int) -> list[str]:
    """The schedules the train and prior stages build from these params, checked by the schedule's own rules
    (stages.core.training_loop.schedule_problems), reported under params.yaml's keys."""
    train = params.train
    names = {"updates_per_call": "train.updates_per_call", "refresh_every": "train.refresh_every"}
    runs = {name: getattr(train, _TRAIN_KEYS.get(name, name)) for name in
            ("total_steps", "log_every", "checkpoint_every", "eval_every", "swap_every")}  # fmt: skip
    runs.update(updates_per_call=train.updates_per_call, refresh_every=refresh_every)
    prior = {"total_steps": params.prior.steps, "updates_per_call": train.updates_per_call,
             "log_every": params.prior.steps, "checkpoint_every": params.prior.steps}  # fmt: skip
    errors = [f"train.{_TRAIN_KEYS.get(name, name)}: {problem.format(**names)} (got {runs[name]})"
              for name, problem in schedule_problems(runs)]  # fmt: skip
    errors += [f"prior.steps: {problem.format(**names)} (got {params.prior.steps})"
               for name, problem in dict(schedule_problems(prior)).items() if name == "total_steps"]  # fmt: skip
    return errors


def consistency_errors(params: Params) -> list[str]:
    """`key: problem` lines for settings that are valid alone but contradict each other."""
    errors = []
    train, data = params.train, params.data
    refreshing = [name for name in params.agents.runs if AGENTS[name].refreshes]
    if refreshing and train.refresh_every == 0:
        errors.append(f"train.refresh_every: the {', '.join(refreshing)} agent needs refresh_every > 0 (got 0)")
    errors += _schedule_errors(params, refresh_every=train.refresh_every if refreshing else 0)
    if data.source == "download" and data.episodes is not None:
        errors.append(
            f"data.episodes: source download brings OGBench's published datasets, whose size is OGBench's; "
            f"got episodes={data.episodes} (set episodes: null to download, or source: auto/generate to generate "
            f"{data.episodes} episodes)"
        )
    if params.evaluate.workers > params.evaluate.envs:
        errors.append(
            f"evaluate.workers: more env worker processes than environments "
            f"(got workers={params.evaluate.workers} > envs={params.evaluate.envs})"
        )
    for i, dataset in enumerate(params.datasets):
        numbers = task_numbers(dataset)
        for j, number in enumerate(params.tasks):
            if number not in numbers:
                errors.append(
                    f"tasks[{j}]: task {number} does not exist for datasets[{i}] ({dataset}): OGBench registers "
                    f"tasks {', '.join(map(str, numbers))} for it"
                )
        if parse_dataset(dataset).needs_expert_weights and not data.wants_download:
            errors.append(
                f"data: {dataset} (datasets[{i}]) cannot be generated here: OGBench made it with expert "
                f"policies whose weights are only on the OGBench server; download it (data.episodes: null, "
                f"source: auto or download)"
            )
        h = resolve_agent(params, dataset).h
        if data.episode_steps is not None and data.episode_steps - 1 < h:
            errors.append(
                f"data.episode_steps: episodes of {data.episode_steps} rows hold {data.episode_steps - 1} "
                f"transitions, fewer than the action chunk h={h} of datasets[{i}] ({dataset})"
            )
    return errors


def consistency_warnings(params: Params) -> list[str]:
    """`key: note` lines for settings that no configured agent or stage reads (harmless, but likely a slip)."""
    notes = []
    if params.train.refresh_every > 0 and not any(AGENTS[name].refreshes for name in params.agents.runs):
        refreshers = ", ".join(name for name, agent in AGENTS.items() if agent.refreshes)
        notes.append(
            f"train.refresh_every={params.train.refresh_every} is not used: no configured agent refreshes its "
            f"cache (only {refreshers} does)"
        )
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _key_path(loc: tuple) -> str:
    """'data.episodes', 'datasets[0]': the params.yaml key of a pydantic error location (union/validator tags dropped)."""
    model: type[BaseModel] | None = Params
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if model is None or part not in model.model_fields:
            break  # a tag pydantic adds inside one key's value (e.g. which union branch failed)
        path += f".{part}" if path else part
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return path or "(top level)"


def _section_fields(loc: tuple) -> list[str]:
    """Allowed keys of the mapping at `loc` (for 'unknown key' messages)."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return list(model.model_fields)


def _describe(error: dict) -> tuple[str, str]:
    """(key path, message) of one pydantic error, phrased for a person editing params.yaml."""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        parent = _key_path(loc[:-1]) if loc[:-1] else ""
        allowed = ", ".join(_section_fields(loc[:-1]))
        return f"{parent}.{loc[-1]}" if parent else str(loc[-1]), f"unknown key (allowed here: {allowed})"
    if error["type"] == "missing":
        return _key_path(loc), "missing (every key must be set in params.yaml)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "value_error" and "input" in error:
        message = f"{message} (got {error['input']!r})"
    return _key_path(loc), message


def _format_errors(source: str, lines: list[str]) -> str:
    head = f"{source}: {len(lines)} invalid setting{'s' if len(lines) > 1 else ''}:"
    return "\n".join([head, *(f"  - {line}" for line in lines)])


def validate_params(raw: Any, source: str = "params") -> Params:
    """Validate a parsed params mapping; ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections (got {type(raw).__name__})")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        described = dict.fromkeys(": ".join(_describe(e)) for e in exc.errors())  # dedupe union branches
        raise ParamsError(_format_errors(source, list(described))) from None
    errors = consistency_errors(params)
    if errors:
        raise ParamsError(_format_errors(source, errors))
    for note in consistency_warnings(params):
        logging.getLogger("stages.params").warning("%s: %s", source, note)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; ParamsError (never another exception) on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(raw, source=str(path))
