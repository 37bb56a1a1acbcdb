"""``python -m stages.verify_cache``: a damaged DVC cache object, which ``dvc checkout`` copies into the workspace
without a word, is named (object and workspace path), exits 1, and ``--remove`` + ``dvc repro`` brings it back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core import cache_integrity

ROOT = Path(__file__).resolve().parent.parent
STAGE = """stages:
  make:
    cmd: python -c "import pathlib; d = pathlib.Path('out'); d.mkdir(exist_ok=True); [(d / f'{i}.bin').write_bytes(bytes(range(256)) * (i + 1)) for i in range(3)]; pathlib.Path('single.txt').write_text('one file')"
    outs:
      - out
      - single.txt
"""


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT))
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


def verify(repo: Path, *extra: str) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "stages.verify_cache", *extra], repo, check=False)


@pytest.fixture()
def repo(tmp_path):
    sh(["git", "init", "-q"], tmp_path)
    sh(["dvc", "init", "-q"], tmp_path)
    sh(["dvc", "config", "core.analytics", "false"], tmp_path)
    (tmp_path / "dvc.yaml").write_text(STAGE)
    sh(["dvc", "repro", "-q"], tmp_path)
    return tmp_path


def object_of(repo: Path, relpath: str) -> Path:
    cache = cache_integrity.cache_dir(repo)
    md5 = cache_integrity.locked_files(repo, cache)[relpath]
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def flip(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_intact_cache_and_workspace_pass(repo):
    files = cache_integrity.locked_files(repo, cache_integrity.cache_dir(repo))
    assert sorted(files) == ["out/0.bin", "out/1.bin", "out/2.bin", "single.txt"]
    result = verify(repo)
    assert result.returncode == 0, result.stderr
    assert "match their hashes" in result.stderr


def test_a_damaged_object_that_dvc_checkout_copies_silently_is_named_and_restored(repo):
    good = (repo / "out" / "1.bin").read_bytes()
    obj = object_of(repo, "out/1.bin")
    flip(obj)
    (repo / "out" / "1.bin").unlink()
    checkout = sh(["dvc", "checkout"], repo, check=False)
    assert checkout.returncode == 0 and (repo / "out" / "1.bin").read_bytes() != good  # DVC's own behaviour

    result = verify(repo)
    assert result.returncode == 1
    damaged = [line for line in result.stdout.splitlines() if line.startswith("damaged: ")]
    assert len(damaged) == 2, result.stdout  # the object, and the workspace copy made of it
    assert any(str(obj.relative_to(repo)) in line and "(out/1.bin)" in line for line in damaged)
    assert any(line.startswith("damaged: out/1.bin") for line in damaged)
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: RuntimeError: 2 damaged file(s) in the DVC cache or workspace, holding out/1.bin: rerun with --remove")

    removed = verify(repo, "--remove")
    assert removed.returncode == 1 and not obj.exists() and not (repo / "out" / "1.bin").exists()
    sh(["dvc", "repro", "-q"], repo)
    assert (repo / "out" / "1.bin").read_bytes() == good
    assert verify(repo).returncode == 0


def test_a_damaged_directory_listing_and_a_damaged_single_file_object_are_named(repo):
    listing = next(cache_integrity.cache_dir(repo).glob("files/md5/*/*.dir"))
    flip(listing)
    flip(object_of(repo, "single.txt"))
    result = verify(repo, "--cache-only")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(listing.name in line for line in lines) and any("(single.txt)" in line for line in lines), lines


def test_outside_a_dvc_repository_it_says_so(tmp_path):
    result = verify(tmp_path)
    assert result.returncode == 1 and "is not a DVC repository" in result.stderr
