"""Fixed-seed fuzzing of every loader of shared artifacts (a few hundred mutations each; the campaign,
benchmarks/hardening.py, runs thousands): each damaged file must load as still-valid content or raise the loader's
own error type with a one-line message naming the file; never another exception, a hang, a crash or an allocation
beyond the worker's address-space limit."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.hardening import fuzz
from stages.core.ogbench_data import DatasetFileError, read_npz, write_npz

CASES = {"npz-validate": 300, "npz-training": 150, "shards-read": 300, "shards-iter": 150, "policy-load": 300,
         "policy-decode": 150}

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("target", sorted(CASES))
def test_damaged_files_raise_the_loaders_own_error(target, tmp_path):
    outcomes = fuzz.fuzz_target(target, CASES[target], seed=1234, workdir=tmp_path)
    assert len(outcomes) == CASES[target]
    failures = [f"#{o.index} {o.mutation}: {o.detail}" for o in outcomes if not o.ok]
    assert failures == []
    # the mutations reach past the first check: some loads are refused, and some damage is harmless
    details = {o.detail for o in outcomes}
    assert any(d.endswith("Error") for d in details)


def test_the_harness_reports_other_exceptions_hangs_and_crashes(tmp_path, monkeypatch):
    """The worker's verdicts themselves: a foreign exception, a hang, a too large allocation, a crash."""
    ctx = {}

    def target_with(load):
        return fuzz.Target("probe", lambda workdir: ctx, lambda rng, c, trial: ("nothing", False), load,
                           lambda c, r: True, lambda: DatasetFileError, lambda c, t: ["probe.npz"])

    def named(c, trial):
        raise DatasetFileError(f"{trial}/probe.npz: bad")

    def foreign(c, trial):
        raise KeyError("observations")

    def unnamed(c, trial):
        raise DatasetFileError("bad file")

    def greedy(c, trial):
        return bytearray(fuzz.MEMORY_HEADROOM * 4)

    assert fuzz.run_case(target_with(named), ctx, 0, 0, tmp_path / "t").ok
    assert "KeyError" in fuzz.run_case(target_with(foreign), ctx, 0, 0, tmp_path / "t").detail
    assert "names no file" in fuzz.run_case(target_with(unnamed), ctx, 0, 0, tmp_path / "t").detail
    monkeypatch.setattr(fuzz, "CASE_SECONDS", 0.5)
    import signal
    import time

    signal.signal(signal.SIGALRM, fuzz._alarm)
    try:
        hang = fuzz.run_case(target_with(lambda c, trial: time.sleep(5)), ctx, 0, 0, tmp_path / "t")
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert not hang.ok and hang.detail.startswith("hang")
    # allocation beyond the limit, and a crash: in a real worker process (the limit applies there only)
    outcomes = fuzz.probe_worker(tmp_path)
    assert [o.detail.split(" ")[0] for o in outcomes] == ["MemoryError", "crash:"]


def test_a_header_claiming_a_trillion_elements_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.npz"
    write_npz(path, {"terminals": np.zeros(4, bool)})
    members = fuzz.zip_members(path.read_bytes())
    name, payload = members[0]
    edited = payload.replace(b"'shape': (4,)", b"'shape': (1000000000000,)")
    assert edited != payload
    path.write_bytes(fuzz.build_zip([(name, edited)]))
    with pytest.raises(DatasetFileError, match=r"huge\.npz: unreadable array .*1000000000000"):
        read_npz(path)


def test_mutations_are_reproducible():
    data = bytes(range(256)) * 8
    first = fuzz.mutate_bytes(random.Random("seed/3"), data)
    assert fuzz.mutate_bytes(random.Random("seed/3"), data) == first
    assert first[0] != data
