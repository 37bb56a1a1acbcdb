"""scripts/byte_identity.py matches artifacts by role across layouts and tells payload from metadata differences."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import byte_identity

TASK = "cube-single-play-singletask-task2-v0"
DATASET = "cube-single-play-v0"


def test_the_layouts_before_and_after_issue_11_give_the_same_roles():
    pairs = [
        (f"data/datasets/{DATASET}.npz", f"data/datasets/{DATASET}/{DATASET}.npz"),
        (f"data/datasets/{DATASET}-val.npz", f"data/datasets/{DATASET}/{DATASET}-val.npz"),
        ("data/datasets/puzzle-4x4-play-100m-v0/puzzle-4x4-play-v0-000.npz",) * 2,
        (f"data/priors/{TASK}/policy.msgpack", f"data/priors/{DATASET}/policy.msgpack"),
        (f"data/reversed/{TASK}/part-00000.parquet", f"data/reversed/{DATASET}/part-00000.parquet"),
        (f"data/runs/rql/{TASK}/seed0/policy.msgpack", f"data/runs/rql/{DATASET}/task2/seed0/policy.msgpack"),
    ]
    for before, after in pairs:
        assert byte_identity.role(before) == byte_identity.role(after) is not None, (before, after)
    assert byte_identity.role(f"data/runs/rql/{DATASET}/task2/seed0/summary.json") is None
    assert byte_identity.role("data/datasets/manifest.json") is None  # compared by each dataset's entry
    manifest = {"datasets": {DATASET: {"source": "generate"}}, "tasks": {TASK: DATASET}, "versions": {"ogbench": "1"}}
    assert byte_identity.manifest_roles(manifest) == {
        f"dataset {DATASET}: manifest entry": {"entry": {"source": "generate"}, "versions": {"ogbench": "1"}}}


def test_a_difference_is_named_by_its_keys_and_fails_unless_allowed():
    old = {"p": {"sha256": "a", "arrays": "x", "content": {"metadata": {"task": "t", "steps": 1}}},
           "s": {"sha256": "b"}}
    new = {"p": {"sha256": "c", "arrays": "x", "content": {"metadata": {"dataset": "d", "steps": 1}}},
           "s": {"sha256": "b"}}
    lines, ok = byte_identity.compare(old, new, set())
    assert not ok and "metadata differs at metadata.dataset, metadata.task (not allowed" in lines[0]
    lines, ok = byte_identity.compare(old, new, {"metadata.task", "metadata.dataset"})
    allowed = "content p: arrays identical, metadata differs at metadata.dataset, metadata.task (allowed)"
    assert ok and lines == [allowed, "identical s"]
    other_arrays = {**new, "p": {**new["p"], "arrays": "y"}}
    assert not byte_identity.compare(old, other_arrays, {"metadata.task", "metadata.dataset"})[1]
    assert not byte_identity.compare(old, {"p": old["p"]}, set())[1]  # a role missing on one side
