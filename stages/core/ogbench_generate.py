"""Generate OGBench datasets locally with OGBench's scripted oracles, following OGBench's own recipe.

Recipe (OGBench's data-generation scripts):
- environments are made with `terminate_at_goal=False, max_episode_steps=1001` (manipulation also
  `mode='data_collection'`); every episode has exactly `episode_steps` rows, `terminals` True on the last;
- manipulation "play": the plan oracles (`ogbench.manipspace.oracles.plan`), noise 0.1, smoothing 0.5; the oracle of
  each new target comes from `info['privileged/target_task']`; when it is done, `set_new_target(p_stack=...)` with
  p_stack 0 (single cube), U(0, 0.25) double, U(0.05, 0.35) triple, U(0.1, 0.5) quadruple, 0.5 otherwise;
- manipulation "noisy": the Markov oracles (min_norm 0.4), Gaussian action noise of per-episode scale xi ~ U(0, 0.1)
  (x3 on yaw, x10 on the gripper), and random actions with probability 0.1 (cube, scene) or 0.2 (puzzle);
- pointmaze: the environment's BFS subgoal direction plus Gaussian noise 0.5; "navigate" starts anywhere and
  re-targets a random junction cell whenever the goal is reached; "stitch" targets a cell 4 steps away (201 rows);
- stored qpos/qvel/button_states are the `prev_*` values from info (the state the observation was taken in);
- scene episodes failing OGBench's cube-position health check are regenerated;
- validation episodes: episodes // 10.

Determinism: OGBench's script never seeds. Here every episode draws from its own seed, derived from
(seed, split, file index, episode index, retry): the global numpy stream (used by OGBench's oracles) and the env's
`np_random` are set from it before the reset. An episode's rows therefore depend only on its seed, not on which worker
process ran it or what ran before, so results are identical for any number of workers. Random actions are drawn as
uniform [-1, 1] from the episode's stream (OGBench's `action_space.sample()` is unseedable for these envs).
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from stages.core.ogbench_names import parse_dataset
from stages.core.parent_watch import die_with_parent

SPLITS = ("train", "val")
_P_STACK_RANGES = {
    "single": (0.0, 0.0),
    "double": (0.0, 0.25),
    "triple": (0.05, 0.35),
    "quadruple": (0.1, 0.5),
}
_NOISY_RANDOM_ACTION = {"cube": 0.1, "scene": 0.1, "puzzle": 0.2}


class GenerationError(RuntimeError):
    """A dataset cannot be generated locally; the message says why and what to do instead."""


class ExpertWeightsRequired(GenerationError):
    """The dataset was collected by trained expert policies whose weights only the OGBench server has."""


@dataclass(frozen=True)
class Recipe:
    """How OGBench collected one dataset."""

    dataset: str  # OGBench dataset name, e.g. cube-single-play-v0
    env_id: str  # goal-conditioned env used for collection, e.g. cube-single-v0
    family: str  # cube-single, scene, puzzle-3x3, pointmaze-medium, ...
    dataset_type: str  # play | noisy | navigate | stitch
    episode_steps: int  # rows per episode
    ogbench_episodes: int  # training episodes in OGBench's own file (for reference)
    noise: (
        float  # play: plan noise; noisy: upper bound of the per-episode noise scale; pointmaze: action noise
    )
    noise_smoothing: float  # plan oracles' temporal smoothing (sigma, in steps)
    min_norm: float  # Markov oracles' minimum action norm
    p_random_action: float  # probability of a uniformly random action

    @property
    def is_manipulation(self) -> bool:
        return parse_dataset(self.dataset).is_manipulation

    @property
    def has_buttons(self) -> bool:
        return parse_dataset(self.dataset).has_buttons

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_for_dataset(dataset: str, episode_steps: int | None = None) -> Recipe:
    """OGBench's recipe for `dataset` (a 1M or 100m name). `episode_steps` overrides the episode length (tests).
    ExpertWeightsRequired for antmaze/humanoidmaze/antsoccer, GenerationError for anything else unsupported."""
    try:
        spec = parse_dataset(dataset)
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    family, dataset_type, version, kind = spec.family, spec.dataset_type, spec.version, spec.kind
    if spec.needs_expert_weights:
        raise ExpertWeightsRequired(
            f"{dataset}: OGBench collected this dataset with trained expert policies (SAC checkpoints) whose weights "
            f"are only on the OGBench download server, so it cannot be generated locally. Run the download stage on a "
            f"machine with internet (then `dvc push` to share it), or place {dataset}.npz and {dataset}-val.npz in "
            f"~/.ogbench/data, where the download stage looks first."
        )
    if spec.is_manipulation and dataset_type in ("play", "noisy"):
        play = dataset_type == "play"
        episodes = {"cube-triple": 3000, "cube-quadruple": 5000, "puzzle-4x5": 3000, "puzzle-4x6": 5000}
        return Recipe(
            dataset=dataset,
            env_id=f"{family}-{version}",
            family=family,
            dataset_type=dataset_type,
            episode_steps=episode_steps or 1001,
            ogbench_episodes=episodes.get(family, 1000),
            noise=0.1,
            noise_smoothing=0.5,
            min_norm=0.4,
            p_random_action=0.0 if play else _NOISY_RANDOM_ACTION[kind],
        )
    if kind == "pointmaze" and dataset_type in ("navigate", "stitch"):
        giant = family == "pointmaze-giant"
        default_steps = 201 if dataset_type == "stitch" else (2001 if giant else 1001)
        default_episodes = 5000 if dataset_type == "stitch" else (500 if giant else 1000)
        return Recipe(
            dataset=dataset,
            env_id=f"{family}-{version}",
            family=family,
            dataset_type=dataset_type,
            episode_steps=episode_steps or default_steps,
            ogbench_episodes=default_episodes,
            noise=0.5,
            noise_smoothing=0.0,
            min_norm=0.0,
            p_random_action=0.0,
        )
    raise GenerationError(f"{dataset}: no generation recipe for {family} {dataset_type} datasets")


# ---------------------------------------------------------------------------------------------------------------------
# Seeds and environments
# ---------------------------------------------------------------------------------------------------------------------


def episode_seed(seed: int, split: str, shard: int, episode: int, attempt: int = 0) -> np.random.SeedSequence:
    """The seed of one episode; independent of worker count and of the order episodes run in."""
    return np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS.index(split), shard, episode, attempt))


def _seed_streams(env: Any, seed_sequence: np.random.SeedSequence) -> None:
    """Point every random source an episode uses at streams derived from its seed."""
    global_state, env_state = seed_sequence.spawn(2)
    np.random.seed(global_state.generate_state(4))  # OGBench's oracles and maze noise use the global stream
    env.unwrapped.np_random = np.random.default_rng(env_state)
    if hasattr(env.unwrapped, "maze_map"):  # maze resets take a few action_space.sample() steps
        env.unwrapped.action_space.seed(int(env_state.generate_state(1)[0]))


def make_collection_env(recipe: Recipe) -> Any:
    """The environment OGBench collects this dataset in."""
    import gymnasium
    import ogbench  # noqa: F401  (registers the environments)

    # OGBench's envs build float64-bounded Boxes; gymnasium warns about the float32 cast on every new Box.
    warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")
    kwargs: dict[str, Any] = {"terminate_at_goal": False, "max_episode_steps": recipe.episode_steps}
    if recipe.is_manipulation:
        kwargs["mode"] = "data_collection"
    return gymnasium.make(recipe.env_id, disable_env_checker=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# One episode
# ---------------------------------------------------------------------------------------------------------------------


def _oracles(env: Any, recipe: Recipe) -> dict[str, Any]:
    """OGBench's oracle for each target kind of this environment (new objects: no state crosses episodes)."""
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
    from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    kind = parse_dataset(recipe.dataset).kind
    if recipe.dataset_type == "play":
        plan = {"env": env, "noise": recipe.noise, "noise_smoothing": recipe.noise_smoothing}
        if kind == "cube":
            return {"cube": CubePlanOracle(**plan)}
        if kind == "puzzle":
            return {"button": ButtonPlanOracle(gripper_always_closed=True, **plan)}
        return {
            "cube": CubePlanOracle(**plan),
            "button": ButtonPlanOracle(**plan),
            "drawer": DrawerPlanOracle(**plan),
            "window": WindowPlanOracle(**plan),
        }
    markov = {"env": env, "min_norm": recipe.min_norm}
    if kind == "cube":
        return {"cube": CubeMarkovOracle(**markov)}
    if kind == "puzzle":
        return {"button": ButtonMarkovOracle(gripper_always_closed=True, **markov)}
    return {
        "cube": CubeMarkovOracle(max_step=100, **markov),
        "button": ButtonMarkovOracle(**markov),
        "drawer": DrawerMarkovOracle(**markov),
        "window": WindowMarkovOracle(**markov),
    }


def _p_stack(family: str) -> float:
    """Per-episode probability of stacking the target cube (drawn from the global stream, as OGBench does)."""
    if family.startswith("cube-"):
        low, high = _P_STACK_RANGES[family.split("-")[1]]
        return 0.0 if high == 0.0 else float(np.random.uniform(low, high))
    return 0.5


def _scene_episode_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's scene check: the cube stays visible (not too far right, nor too far left unless in the drawer)."""
    xyz = qpos[:, 14:17]
    too_far_right = (xyz[:, 1] >= 0.29).any()
    too_far_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_far_right or too_far_left)


def _stack_rows(rows: dict[str, list]) -> dict[str, np.ndarray]:
    dtypes = {"terminals": bool, "button_states": np.int64}
    return {key: np.asarray(values, dtype=dtypes.get(key, np.float32)) for key, values in rows.items()}


def _manipulation_episode(
    env: Any, recipe: Recipe, seed_sequence: np.random.SeedSequence
) -> dict[str, np.ndarray]:
    _seed_streams(env, seed_sequence)
    ob, info = env.reset()
    p_stack = _p_stack(recipe.family)
    markov = recipe.dataset_type == "noisy"
    xi = np.random.uniform(0, recipe.noise) if markov else 0.0
    oracles = _oracles(env, recipe)
    agent = oracles[info["privileged/target_task"]]
    agent.reset(ob, info)
    action_dim = env.action_space.shape[0]

    rows: dict[str, list] = {key: [] for key in ("observations", "actions", "terminals", "qpos", "qvel")}
    if recipe.has_buttons:
        rows["button_states"] = []
    done = False
    while not done:
        if np.random.rand() < recipe.p_random_action:
            action = np.random.uniform(-1.0, 1.0, size=action_dim)
        else:
            action = np.array(agent.select_action(ob, info))
            if markov:
                action = action + np.random.normal(0, [xi, xi, xi, xi * 3, xi * 10], action.shape)
        action = np.clip(action, -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if agent.done:
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            agent = oracles[agent_info["privileged/target_task"]]
            agent.reset(agent_ob, agent_info)
        rows["observations"].append(ob)
        rows["actions"].append(action)
        rows["terminals"].append(done)
        rows["qpos"].append(info["prev_qpos"])
        rows["qvel"].append(info["prev_qvel"])
        if recipe.has_buttons:
            rows["button_states"].append(info["prev_button_states"])
        ob = next_ob
    return _stack_rows(rows)


def _maze_cells(maze_map: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(all free cells, free cells that are not straight hallway cells), as OGBench samples starts and goals."""
    free, vertices = [], []
    for i in range(maze_map.shape[0]):
        for j in range(maze_map.shape[1]):
            if maze_map[i, j] != 0:
                continue
            free.append((i, j))
            up, down, left, right = (
                maze_map[i - 1, j],
                maze_map[i + 1, j],
                maze_map[i, j - 1],
                maze_map[i, j + 1],
            )
            vertical = up == 0 and down == 0 and left == 1 and right == 1
            horizontal = left == 0 and right == 0 and up == 1 and down == 1
            if not (vertical or horizontal):
                vertices.append((i, j))
    return free, vertices


def _cells_at_distance(maze_map: np.ndarray, start: tuple[int, int], steps: int) -> list[tuple[int, int]]:
    """Free cells exactly `steps` BFS moves from `start` (OGBench's stitch goals)."""
    distance = {start: 0}
    queue, found = [start], []
    while queue:
        i, j = queue.pop(0)
        for di, dj in ((-1, 0), (0, -1), (1, 0), (0, 1)):
            cell = (i + di, j + dj)
            inside = 0 <= cell[0] < maze_map.shape[0] and 0 <= cell[1] < maze_map.shape[1]
            if inside and maze_map[cell] == 0 and cell not in distance:
                distance[cell] = distance[(i, j)] + 1
                queue.append(cell)
                if distance[cell] == steps:
                    found.append(cell)
    return found


def _pointmaze_episode(
    env: Any, recipe: Recipe, seed_sequence: np.random.SeedSequence
) -> dict[str, np.ndarray]:
    _seed_streams(env, seed_sequence)
    maze = env.unwrapped
    free, vertices = _maze_cells(maze.maze_map)
    init_ij = free[np.random.randint(len(free))]
    if recipe.dataset_type == "navigate":
        goal_ij = vertices[np.random.randint(len(vertices))]
    else:
        nearby = _cells_at_distance(maze.maze_map, init_ij, 4)
        goal_ij = nearby[np.random.randint(len(nearby))] if nearby else init_ij
    ob, _ = env.reset(options={"task_info": {"init_ij": init_ij, "goal_ij": goal_ij}})

    rows: dict[str, list] = {key: [] for key in ("observations", "actions", "terminals", "qpos", "qvel")}
    done = False
    while not done:
        subgoal_xy, _ = maze.get_oracle_subgoal(maze.get_xy(), maze.cur_goal_xy)
        direction = subgoal_xy - maze.get_xy()
        direction = direction / (np.linalg.norm(direction) + 1e-6)
        action = np.clip(direction + np.random.normal(0, recipe.noise, direction.shape), -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if info["success"] and recipe.dataset_type == "navigate":
            maze.set_goal(vertices[np.random.randint(len(vertices))])
        rows["observations"].append(ob)
        rows["actions"].append(action)
        rows["terminals"].append(done)
        rows["qpos"].append(info["prev_qpos"])
        rows["qvel"].append(info["prev_qvel"])
        ob = next_ob
    return _stack_rows(rows)


def generate_episode(
    env: Any, recipe: Recipe, *, seed: int, split: str, shard: int, episode: int, max_retries: int = 100
) -> dict[str, np.ndarray]:
    """One episode's raw rows (OGBench format). Scene episodes failing the health check are redrawn with the next
    retry seed, as OGBench's script regenerates them."""
    collect = _manipulation_episode if recipe.is_manipulation else _pointmaze_episode
    for attempt in range(max_retries):
        rows = collect(env, recipe, episode_seed(seed, split, shard, episode, attempt))
        if recipe.family != "scene" or _scene_episode_is_healthy(rows["qpos"]):
            return rows
    raise GenerationError(
        f"{recipe.dataset}: {split} episode {episode} failed the scene health check {max_retries} times"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Many episodes, many processes
# ---------------------------------------------------------------------------------------------------------------------

_worker_env: Any = None
_worker_recipe: Recipe | None = None


def _init_worker(recipe: Recipe) -> None:
    global _worker_env, _worker_recipe
    die_with_parent()  # a killed stage must not leave its generation processes running
    _worker_recipe = recipe
    _worker_env = make_collection_env(recipe)


def _run_episode(job: tuple[int, str, int, int]) -> dict[str, np.ndarray]:
    seed, split, shard, episode = job
    return generate_episode(_worker_env, _worker_recipe, seed=seed, split=split, shard=shard, episode=episode)


def _episodes(
    recipe: Recipe, jobs: list[tuple[int, str, int, int]], workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """Episodes of `jobs` in job order, run in `workers` processes (in this process when 1)."""
    if workers <= 1 or len(jobs) <= 1:
        env = make_collection_env(recipe)
        for seed, split, shard, episode in jobs:
            yield generate_episode(env, recipe, seed=seed, split=split, shard=shard, episode=episode)
        return
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited threads or RNG state
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(recipe,)) as pool:
        yield from pool.imap(_run_episode, jobs, chunksize=1)


def _concatenate(episodes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([episode[key] for episode in episodes]) for key in episodes[0]}


def generate_splits(
    recipe: Recipe,
    *,
    episodes: int,
    val_episodes: int,
    seed: int,
    shard: int = 0,
    workers: int = 1,
    progress: bool = True,
    on_episode: Callable[[int], None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """{'train': arrays, 'val': arrays} of one dataset file pair in OGBench's raw format, identical for any
    `workers`. `on_episode(rows)` is called after each finished episode (for throughput logging)."""
    if episodes < 1 or val_episodes < 1:
        raise GenerationError(f"{recipe.dataset}: need at least one train and one val episode")
    counts = {"train": episodes, "val": val_episodes}
    jobs = [(seed, split, shard, index) for split in SPLITS for index in range(counts[split])]
    collected: list[dict[str, np.ndarray]] = []
    label = recipe.dataset if shard == 0 else f"{recipe.dataset}[{shard:03d}]"
    with tqdm(total=len(jobs), desc=label, unit="episode", disable=not progress, dynamic_ncols=True) as bar:
        for rows in _episodes(recipe, jobs, workers):
            collected.append(rows)
            bar.update()
            if on_episode is not None:
                on_episode(len(rows["terminals"]))
    return {"train": _concatenate(collected[:episodes]), "val": _concatenate(collected[episodes:])}
