"""One dataset of a study, into its own folder: downloaded from OGBench, copied from OGBench's folder, or generated.

Where it comes from (`data.source`):
- download (`data.episodes: null` only: OGBench's published datasets): copied from `ogbench_dir` (OGBench's own
  download folder, outside the repository: a warning says so and the manifest records it) when both files are
  there, else fetched with OGBench's `download_datasets`;
- generate: built with OGBench's scripted oracles (stages.core.ogbench_generate), seeded, in `data.workers`
  processes, with `data.episodes` episodes (null: OGBench's own count);
- auto: with `data.episodes: null` download, and when that fails (offline) generate OGBench's size instead, saying
  so; with a number, generate. Expert-policy datasets (antmaze, humanoidmaze, antsoccer) cannot be generated:
  offline they fail with an error saying what to do.

The folder holds OGBench's own names and format: `<dataset>.npz`, `<dataset>-val.npz` (100m datasets:
`<stem>-NNN.npz` / `<stem>-NNN-val.npz`), and `manifest.json` (source, episodes, seed, sha256 of every file, ogbench
and mujoco versions), written last. Every file is validated and written atomically; identical settings give
byte-identical files, whatever other datasets the study has (generation seeds depend on `data.seed`, the split, the
file and the episode only).
"""

from __future__ import annotations

import http.client
import logging
import shutil
import time
import urllib.error
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.files import atomic_path, sha256_file, temporaries, write_json
from stages.core.ogbench_data import DatasetFileError, validate_raw_file, write_npz
from stages.core.ogbench_generate import Recipe, generate_splits, recipe_for_dataset
from stages.core.ogbench_names import DatasetSpec, check_dataset, shard_file_names

if TYPE_CHECKING:
    from stages.params import DataParams

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OGBENCH_URL = "https://rail.eecs.berkeley.edu/datasets/ogbench"
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)

# (file stems without .npz, target folder, base URL) -> files `<stem>.npz` and `<stem>-val.npz` in the folder.
Downloader = Callable[[list[str], Path, str], None]


class DatasetUnavailable(RuntimeError):
    """A dataset can be neither downloaded nor generated here; the message says which, why and what to do."""


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset and the files it consists of."""

    dataset: str
    spec: DatasetSpec
    file_pairs: tuple[tuple[str, str], ...]  # (train, val) names in the dataset's folder

    @property
    def files(self) -> list[str]:
        return [name for pair in self.file_pairs for name in pair]

    def ogbench_path(self, name: str) -> str:
        """Where OGBench's own folder keeps the file ``name``: beside the others, a large dataset's in its folder."""
        return f"{self.dataset}/{name}" if self.spec.is_large else name


def plan_dataset(dataset: str, shards: int) -> DatasetPlan:
    """The dataset's file names (``shards`` files of a large dataset)."""
    spec = check_dataset(dataset)
    if spec.is_large:
        pairs = tuple(shard_file_names(spec.shard_stem, index) for index in range(shards))
    else:
        pairs = ((f"{dataset}.npz", f"{dataset}-val.npz"),)
    return DatasetPlan(dataset=dataset, spec=spec, file_pairs=pairs)


# ---------------------------------------------------------------------------------------------------------------------
# Output folder hygiene
# ---------------------------------------------------------------------------------------------------------------------


def _owned_files(out: Path) -> Iterator[Path]:
    """Files this stage writes into a dataset's folder: the manifest, npz files and temporaries."""
    for pattern in (MANIFEST, "*.npz", "*.tmp"):
        yield from out.glob(pattern)


def clean_outputs(out: Path) -> None:
    """Remove what an earlier (possibly interrupted) run left, so nothing stale looks complete."""
    for path in _owned_files(out):
        path.unlink()


def remove_dataset_files(out: Path, plan: DatasetPlan) -> None:
    for name in plan.files:
        for path in (out / name, *temporaries(out / name)):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------------------------


@contextmanager
def _ogbench_base_url(url: str) -> Iterator[None]:
    """Point OGBench's downloader at `url` for the duration (its large datasets live in per-dataset folders)."""
    import ogbench.utils

    saved = ogbench.utils.DATASET_URL
    ogbench.utils.DATASET_URL = url
    try:
        yield
    finally:
        ogbench.utils.DATASET_URL = saved


def ogbench_download(stems: list[str], folder: Path, base_url: str) -> None:
    """Fetch `<stem>.npz` and `<stem>-val.npz` into `folder` with OGBench's own `download_datasets`."""
    import ogbench

    folder.mkdir(parents=True, exist_ok=True)
    with _ogbench_base_url(base_url):
        ogbench.download_datasets(stems, dataset_dir=str(folder))


def download_dataset(plan: DatasetPlan, out: Path, ogbench_dir: Path, download: Downloader) -> str:
    """Bring the dataset's files into `out`: copies from `ogbench_dir` when present there, else a download.
    Returns the source recorded in the manifest. Network failures propagate (NETWORK_ERRORS)."""
    copied = downloaded = 0
    base_url = f"{OGBENCH_URL}/{plan.dataset}" if plan.spec.is_large else OGBENCH_URL
    for train, val in plan.file_pairs:
        theirs = [ogbench_dir / plan.ogbench_path(name) for name in (train, val)]
        if all(path.is_file() for path in theirs):
            for name, source in zip((train, val), theirs):
                with atomic_path(out / name) as tmp:
                    shutil.copyfile(source, tmp)
            copied += 1
            continue
        log.info("%s: downloading %s with OGBench", plan.dataset, train)
        download([train.removesuffix(".npz")], out, base_url)
        downloaded += 1
    if copied:
        log.warning(
            "%s: %d of %d file pairs COPIED FROM %s, outside the repository (OGBench's download folder; DVC tracks "
            "the copies in %s, not that folder)", plan.dataset, copied, len(plan.file_pairs), ogbench_dir, out
        )
    return "download" if downloaded else "ogbench-dir"


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


def generate_dataset(plan: DatasetPlan, data: DataParams, out: Path) -> Recipe:
    """Build every file pair of the dataset with OGBench's oracles; file k of a large dataset uses shard index k."""
    recipe = recipe_for_dataset(plan.dataset, episode_steps=data.episode_steps)
    episodes, val_episodes = data.episode_counts(recipe.ogbench_episodes)
    log.info(
        "%s: generating %d train + %d val episodes of %d steps per file (%d file pair%s; OGBench: %d episodes) "
        "in %d processes, seed %d",
        plan.dataset,
        episodes,
        val_episodes,
        recipe.episode_steps,
        len(plan.file_pairs),
        "" if len(plan.file_pairs) == 1 else "s",
        recipe.ogbench_episodes,
        data.workers,
        data.seed,
    )
    for shard, (train, val) in enumerate(plan.file_pairs):
        started, steps = time.perf_counter(), 0

        def count(rows: int) -> None:
            nonlocal steps
            steps += rows

        splits = generate_splits(
            recipe,
            episodes=episodes,
            val_episodes=val_episodes,
            seed=data.seed,
            shard=shard,
            workers=data.workers,
            on_episode=count,
        )
        elapsed = time.perf_counter() - started
        log.info(
            "%s: %d env steps in %.1f s (%.0f steps/s with %d processes)",
            train,
            steps,
            elapsed,
            steps / elapsed,
            data.workers,
        )
        for name, split in ((train, "train"), (val, "val")):
            write_npz(out / name, splits[split])
    return recipe


# ---------------------------------------------------------------------------------------------------------------------
# One dataset, end to end
# ---------------------------------------------------------------------------------------------------------------------


def describe_files(plan: DatasetPlan, out: Path, episode_length: int | None) -> dict[str, dict[str, Any]]:
    """Validate every file of the dataset and describe it for the manifest (DatasetFileError on a bad one)."""
    described = {}
    for name in plan.files:
        summary = validate_raw_file(
            out / name, button_states=plan.spec.has_buttons, episode_length=episode_length
        )
        described[name] = {
            "sha256": sha256_file(out / name),
            "bytes": (out / name).stat().st_size,
            "rows": summary.rows,
            "episodes": summary.episodes,
        }
        log.info(
            "%s: valid, %d rows in %d episodes, %.1f MB",
            name,
            summary.rows,
            summary.episodes,
            described[name]["bytes"] / 1e6,
        )
    return described


def _offline_message(plan: DatasetPlan, error: BaseException) -> str:
    return (
        f"{plan.dataset}: download failed ({error}). OGBench collected this dataset with trained expert policies "
        f"whose weights are only on the OGBench download server, so it cannot be generated locally. Run this stage on "
        f"a machine with internet (then `dvc push` to share the result), or place the OGBench files "
        f"{', '.join(map(plan.ogbench_path, plan.files[:2]))}{' ...' if len(plan.files) > 2 else ''} in the OGBench data folder "
        f"(~/.ogbench/data, or --ogbench-dir), where this stage looks before downloading."
    )


def obtain_dataset(
    plan: DatasetPlan, data: DataParams, out: Path, ogbench_dir: Path, download: Downloader
) -> dict[str, Any]:
    """Download or generate one dataset into `out`, validate it; its manifest entry."""
    if data.wants_download:
        try:
            source = download_dataset(plan, out, ogbench_dir, download)
            entry = {"source": source, "files": describe_files(plan, out, episode_length=None)}
            if source == "ogbench-dir":
                entry["copied_from"] = str(ogbench_dir)
            return entry
        except NETWORK_ERRORS as error:
            remove_dataset_files(out, plan)
            if data.source == "download":
                raise DatasetUnavailable(
                    f"{plan.dataset}: download failed ({error}); set data.source: auto or generate to build it "
                    f"locally with OGBench's oracles"
                ) from None
            if plan.spec.needs_expert_weights:
                raise DatasetUnavailable(_offline_message(plan, error)) from None
            log.warning(
                "%s: download failed (%s): offline, generating with OGBench's oracles instead",
                plan.dataset,
                error,
            )
        except DatasetFileError:
            remove_dataset_files(out, plan)  # a corrupt download must not stay behind looking complete
            raise
    recipe = generate_dataset(plan, data, out)
    episodes, val_episodes = data.episode_counts(recipe.ogbench_episodes)
    return {
        "source": "generate",
        "seed": data.seed,
        "episodes": episodes,
        "val_episodes": val_episodes,
        "recipe": recipe.as_dict(),
        "files": describe_files(plan, out, episode_length=recipe.episode_steps),
    }


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("ogbench", "mujoco", "numpy", "gymnasium")}


def obtain_dataset_folder(
    dataset: str, data: DataParams, out: Path, ogbench_dir: Path, download: Downloader = ogbench_download
) -> dict[str, Any]:
    """The dataset's files into its folder ``out`` (what an earlier run left removed first), then the manifest,
    written last and atomically: ``{"datasets": {dataset: entry}, "versions": ...}``. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    clean_outputs(out)
    plan = plan_dataset(dataset, data.shards)
    log.info("%s (source: %s) into %s", dataset, data.source, out)
    started = time.perf_counter()
    entry = obtain_dataset(plan, data, out, ogbench_dir, download)
    log.info("%s: done (%s) in %.1f s", dataset, entry["source"], time.perf_counter() - started)
    manifest = {"datasets": {dataset: entry}, "versions": library_versions()}
    write_json(out / MANIFEST, manifest)
    log.info("wrote %s", out / MANIFEST)
    return manifest
