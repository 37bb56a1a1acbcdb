"""Dataset generation figures: env steps/s in one process and in all processes, file size per 1M transitions, and
(with --stage) the wall time of the download stage at the default params.yaml.

    python benchmarks/generation_throughput.py [--dataset cube-single-play-v0] [--episodes 4] [--stage]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.core.ogbench_data import write_npz
from stages.core.ogbench_generate import (
    generate_episode,
    generate_splits,
    make_collection_env,
    recipe_for_dataset,
)


def one_process_steps_per_second(dataset: str, episodes: int) -> float:
    """Env steps/s of one process, env construction excluded."""
    recipe = recipe_for_dataset(dataset)
    env = make_collection_env(recipe)
    started, steps = time.perf_counter(), 0
    for episode in range(episodes):
        steps += len(
            generate_episode(env, recipe, seed=0, split="train", shard=0, episode=episode)["terminals"]
        )
    return steps / (time.perf_counter() - started)


def all_processes(dataset: str, episodes: int, workers: int) -> tuple[float, float, dict]:
    """(steps/s over the wall time including process start-up, start-up-free steps/s, train arrays)."""
    recipe = recipe_for_dataset(dataset)
    finished: list[float] = []
    started = time.perf_counter()
    splits = generate_splits(
        recipe,
        episodes=episodes,
        val_episodes=1,
        seed=0,
        workers=workers,
        progress=False,
        on_episode=lambda rows: finished.append(time.perf_counter()),
    )
    wall = time.perf_counter() - started
    steps = (episodes + 1) * recipe.episode_steps
    # Steady state: from the first finished episode of each worker to the last (the first ones include start-up).
    steady = (len(finished) - workers) * recipe.episode_steps / (finished[-1] - finished[workers - 1])
    return steps / wall, steady, splits["train"]


def megabytes_per_million(arrays: dict) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.npz"
        write_npz(path, arrays)
        return path.stat().st_size / len(arrays["terminals"])


def stage_wall_time() -> float:
    """`python -m stages.download` of the default params.yaml's first dataset into a temporary folder (offline:
    generation)."""
    import yaml

    dataset = yaml.safe_load((ROOT / "params.yaml").read_text())["datasets"][0]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.download", "--dataset", dataset, "--out", folder], cwd=ROOT,
                       check=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cube-single-play-v0")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per measurement (1001 steps each)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument(
        "--stage", action="store_true", help="also time the download stage at the default params"
    )
    args = parser.parse_args()

    single = one_process_steps_per_second(args.dataset, args.episodes)
    print(f"{args.dataset}: one process: {single:.0f} env steps/s (env construction excluded)")
    wall, steady, train = all_processes(args.dataset, args.episodes * args.workers, args.workers)
    print(
        f"{args.dataset}: {args.workers} processes: {steady:.0f} env steps/s steady, {wall:.0f} steps/s over the "
        f"wall time including process start-up"
    )
    print(f"{args.dataset}: {megabytes_per_million(train):.0f} MB per 1M transitions (compressed npz)")
    if args.stage:
        print(f"download stage at the default params.yaml: {stage_wall_time():.0f} s wall")


if __name__ == "__main__":
    main()
