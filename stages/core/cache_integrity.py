"""Integrity of a DVC cache and of the workspace copies checked out of it (stdlib only).

DVC names every cache object by the MD5 of its bytes (``files/md5/ab/cdef...``; a directory's listing is an object
``...dir`` of its own) but reads objects back without re-hashing them: ``dvc checkout`` copies a damaged object into
the workspace and exits 0, and ``dvc status`` may then trust its own records of the file. :func:`check` re-hashes
the objects and, through ``dvc.lock``, the workspace files they became, and names each one that does not match.
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.core.files import file_digest


@dataclass(frozen=True)
class Problem:
    path: Path  # the damaged file: a cache object or a workspace file
    expected: str
    actual: str
    used_by: tuple[str, ...]  # workspace paths that are (or come from) this content

    def where(self, root: Path) -> str:
        return str(self.path.relative_to(root) if self.path.is_relative_to(root) else self.path)

    def line(self, root: Path) -> str:
        users = f" ({', '.join(self.used_by)})" if self.used_by else ""
        return f"{self.where(root)}{users}: content MD5 {self.actual}, expected {self.expected}"


def cache_dir(root: Path) -> Path:
    """The repository's DVC cache: ``cache.dir`` of .dvc/config.local or .dvc/config (relative to .dvc/), else .dvc/cache."""
    for name in ("config.local", "config"):
        config = configparser.ConfigParser()
        try:
            config.read(root / ".dvc" / name)
        except configparser.Error as exc:
            raise ValueError(f".dvc/{name} cannot be read: {exc}") from exc
        if config.has_option("cache", "dir"):
            return (root / ".dvc" / config.get("cache", "dir")).resolve()
    return root / ".dvc" / "cache"


def _objects(cache: Path) -> Iterator[tuple[str, Path]]:
    """(hash, path) of every object: ``files/md5/ab/cdef`` -> abcdef (``.dir`` listings included, suffix kept)."""
    base = cache / "files" / "md5"
    if not base.is_dir():
        return
    for prefix in sorted(base.iterdir()):
        if prefix.is_dir() and len(prefix.name) == 2:
            for obj in sorted(prefix.iterdir()):
                if obj.is_file() and not obj.name.endswith(".tmp"):
                    yield prefix.name + obj.name, obj


def locked_files(root: Path, cache: Path) -> dict[str, str]:
    """Workspace path -> expected MD5 of every file dvc.lock records (directories expanded through their listings
    where the cache holds them)."""
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"dvc.lock cannot be read: {exc}") from exc
    files: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            md5, path = out.get("md5"), out.get("path")
            if not md5 or not path:
                continue
            if not md5.endswith(".dir"):
                files[path] = md5
                continue
            listing = cache / "files" / "md5" / md5[:2] / md5[2:]
            try:
                entries = json.loads(listing.read_text())
            except (OSError, ValueError):
                continue  # listing absent (not fetched) or damaged (reported as an object)
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and entry.get("relpath") and entry.get("md5"):
                    files[f"{path}/{entry['relpath']}"] = entry["md5"]
    return files


def check(root: Path, workspace: bool = True) -> list[Problem]:
    """Every damaged cache object and (``workspace``) every workspace file of dvc.lock whose bytes differ from the
    hash recorded for it. A file that is absent is not a problem here (``dvc status`` reports it)."""
    root = root.resolve()
    cache = cache_dir(root)
    files = locked_files(root, cache)
    users: dict[str, list[str]] = {}
    for path, md5 in files.items():
        users.setdefault(md5, []).append(path)
    problems = []
    for name, obj in _objects(cache):
        expected = name.removesuffix(".dir")
        actual = file_digest(obj, "md5")
        if actual != expected:
            problems.append(Problem(obj, expected, actual, tuple(sorted(users.get(name, [])))))
    if workspace:
        for path, md5 in sorted(files.items()):
            target = root / path
            if target.is_file() and (actual := file_digest(target, "md5")) != md5:
                problems.append(Problem(target, md5, actual, (path,)))
    return problems
