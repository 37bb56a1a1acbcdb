"""Fuzzing of every loader of shared artifacts: dataset npz, reversal-cache shards + manifest, policy exports.

Each case mutates a valid small file (bit flips, truncations, byte insertions and deletions, zip directory and npy
header edits, JSON edits of the manifest, resealed policy bodies, ...) and loads it. A load must either succeed on
content that is still valid, or raise the loader's own error type (DatasetFileError, ShardCacheError,
PolicyFileError) with a one-line message naming the file. Anything else fails the case: another exception type,
a hang (each load runs under a time limit), a crash of the process, or a MemoryError (loads run in a worker process
whose address space is limited, so an allocation a damaged header asks for shows up instead of swapping).

Cases are reproducible: case ``i`` of loader ``L`` with seed ``s`` is always the same mutation. Workers are
subprocesses (``python -m benchmarks.hardening.fuzz --worker ...``); the parent restarts one after a hang or crash.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEMORY_HEADROOM = 1 << 30  # a worker may allocate this much beyond what it holds after start-up
CASE_SECONDS = 10.0


@dataclass
class Outcome:
    loader: str
    index: int
    mutation: str
    ok: bool
    detail: str = ""


# --------------------------------------------------------------------------------------------------------------
# Byte-level mutations


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _interesting_int(rng: random.Random, width: int) -> int:
    top = (1 << (8 * width)) - 1
    return rng.choice([0, 1, 2, top, top >> 1, (top >> 1) + 1, rng.randrange(top + 1), 10**12 & top, 0x7F, 0x80])


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One random byte-level mutation of ``data`` and its description."""
    data = bytearray(data)
    n = len(data)
    kind = rng.choice(["flip", "flip", "byte", "truncate", "insert", "delete", "duplicate", "zero", "int"])
    at = rng.randrange(max(n, 1))
    if kind == "flip":
        bits = rng.randint(1, 8)
        for _ in range(bits):
            pos = rng.randrange(n)
            data[pos] ^= 1 << rng.randrange(8)
        return bytes(data), f"{bits} bit flips"
    if kind == "byte":
        data[at] = rng.getrandbits(8)
        return bytes(data), f"byte {at} set"
    if kind == "truncate":
        keep = rng.choice([0, 1, rng.randrange(n), n - 1, max(n - rng.randint(1, 64), 0)])
        return bytes(data[:keep]), f"truncated to {keep} of {n} bytes"
    if kind == "insert":
        extra = _rand_bytes(rng, rng.choice([1, 2, 4, 8, rng.randint(1, 512)]))
        return bytes(data[:at] + extra + data[at:]), f"{len(extra)} bytes inserted at {at}"
    if kind == "delete":
        span = rng.randint(1, min(512, max(n - at, 1)))
        return bytes(data[:at] + data[at + span:]), f"{span} bytes deleted at {at}"
    if kind == "duplicate":
        span = rng.randint(1, min(512, max(n - at, 1)))
        return bytes(data[:at] + data[at:at + span] * 2 + data[at + span:]), f"{span} bytes duplicated at {at}"
    if kind == "zero":
        span = rng.randint(1, min(4096, max(n - at, 1)))
        data[at:at + span] = bytes(len(data[at:at + span]))
        return bytes(data), f"{span} bytes zeroed at {at}"
    width = rng.choice([2, 4, 8])
    value = _interesting_int(rng, width)
    data[at:at + width] = value.to_bytes(width, "little")
    return bytes(data), f"{width}-byte int {value} at {at}"


# --------------------------------------------------------------------------------------------------------------
# Zip and npy structure edits

_ZIP_FIELDS = {  # signature -> [(offset, width, name)]
    b"PK\x03\x04": [(4, 2, "version"), (6, 2, "flags"), (8, 2, "method"), (14, 4, "crc"), (18, 4, "csize"),
                    (22, 4, "usize"), (26, 2, "name_len"), (28, 2, "extra_len")],
    b"PK\x01\x02": [(6, 2, "version"), (8, 2, "flags"), (10, 2, "method"), (16, 4, "crc"), (20, 4, "csize"),
                    (24, 4, "usize"), (28, 2, "name_len"), (30, 2, "extra_len"), (32, 2, "comment_len"),
                    (34, 2, "disk"), (38, 4, "ext_attr"), (42, 4, "local_offset")],
    b"PK\x05\x06": [(4, 2, "disk"), (8, 2, "entries_disk"), (10, 2, "entries"), (12, 4, "cd_size"),
                    (16, 4, "cd_offset"), (20, 2, "comment_len")],
    b"PK\x06\x06": [(24, 8, "entries_disk"), (32, 8, "entries"), (40, 8, "cd_size"), (48, 8, "cd_offset")],
    b"PK\x06\x07": [(8, 8, "eocd64_offset"), (16, 4, "disks")],
    b"\x01\x00": [(4, 8, "zip64_a"), (12, 8, "zip64_b")],  # zip64 extra field (loose match)
}


def mutate_zip_directory(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Set one field of a zip local header, central directory entry or end record to an interesting value."""
    hits = [(pos, sig) for sig in _ZIP_FIELDS for pos in _find_all(data, sig)]
    if not hits:
        return mutate_bytes(rng, data)
    pos, sig = rng.choice(hits)
    offset, width, name = rng.choice(_ZIP_FIELDS[sig])
    value = _interesting_int(rng, width)
    out = bytearray(data)
    out[pos + offset:pos + offset + width] = value.to_bytes(width, "little")[:len(out[pos + offset:pos + offset
                                                                                      + width])]
    return bytes(out), f"zip {sig!r}@{pos} {name} = {value}"


def _find_all(data: bytes, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def build_zip(members: list[tuple[str, bytes]], stored: bool = False) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, payload in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            archive.writestr(info, payload)
    return buffer.getvalue()


_NPY_SHAPES = ["(1000000000000,)", "(10000000000, 3)", "(-1,)", "()", "(0,)", "(2**70,)", "('a',)", "(3, -2)",
               "(9223372036854775807,)", "(4611686018427387904, 4)", "(1,)", "(2, 1000000)", "(None,)", "[3]"]
_NPY_DTYPES = ["'|O'", "'<f8'", "'>f4'", "'|V4'", "'<U10'", "'|S3'", "[('a', '<f4')]", "'<M8[s]'", "'<i4'",
               "'|b1'", "'<f2'", "'<c8'", "'bogus'", "3", "'<f4'", "'<i8'", "'|u1'", "[('a', '|O')]"]


def mutate_npy_header(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Edit the npy header of one member (shape, dtype, fortran order, version, header length, garbage) and rezip
    with valid CRCs, so the zip layer passes and the npy layer is what is attacked."""
    members = zip_members(data)
    index = rng.randrange(len(members))
    name, payload = members[index]
    magic, major, header_len_bytes = payload[:6], payload[6], 2 if payload[6] == 1 else 4
    header_len = int.from_bytes(payload[8:8 + header_len_bytes], "little")
    start = 8 + header_len_bytes
    header = payload[start:start + header_len].decode("latin1")
    body = payload[start + header_len:]
    fields = ast.literal_eval(header)
    kind = rng.choice(["shape", "shape", "dtype", "dtype", "fortran", "version", "length", "garbage", "long",
                       "member"])
    if kind == "member":
        action = rng.choice(["rename", "drop", "duplicate", "extra", "dir"])
        if action == "rename":
            members[index] = (rng.choice(["obs.npy", "observations", "../observations.npy", "a/b.npy",
                                          name.upper()]), payload)
        elif action == "drop":
            del members[index]
        elif action == "duplicate":
            members.append((name, payload))
        elif action == "extra":
            members.append(("extra.npy", payload))
        else:
            members.append(("folder/", b""))
        return build_zip(members, stored=rng.random() < 0.3), f"npz member {name}: {action}"
    if kind in ("shape", "dtype", "fortran"):
        shape = rng.choice(_NPY_SHAPES) if kind == "shape" else repr(fields["shape"])
        dtype = rng.choice(_NPY_DTYPES) if kind == "dtype" else repr(fields["descr"])
        fortran = rng.choice(["True", "False", "1", "'x'"]) if kind == "fortran" else repr(fields["fortran_order"])
        text = f"{{'descr': {dtype}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
        what = {"shape": f"shape {shape}", "dtype": f"dtype {dtype}", "fortran": f"fortran_order {fortran}"}[kind]
    elif kind == "garbage":
        text = rng.choice(["{", "{'descr': '<f4'}", "__import__('os').system('true')", "[1, 2, 3]", "{1: 2}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}", "\x00" * 40,
                           _rand_bytes(rng, 40).decode("latin1")])
        what = f"header text {text[:30]!r}"
    elif kind == "long":
        text = header.rstrip("\n") + " " * rng.choice([20000, 70000]) + "\n"
        what = f"header padded to {len(text)} chars"
    else:
        text = header
        what = ""
    version = major
    if kind == "version":
        version = rng.choice([0, 2, 3, 4, 255])
        what = f"npy version {version}"
    encoded = text.encode("latin1")
    width = 2 if version == 1 else 4
    length = len(encoded)
    if kind == "length":
        length = rng.choice([0, 1, length - 1, length + 1, 0xFFFF, 10**6])
        what = f"npy header length {length} (of {len(encoded)})"
    length_bytes = (length & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    members[index] = (name, magic + bytes([version, 0]) + length_bytes + encoded + body)
    return build_zip(members, stored=rng.random() < 0.3), f"npy header of {name}: {what}"


# --------------------------------------------------------------------------------------------------------------
# JSON edits


def _json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _json_paths(child, (*prefix, i))


_JSON_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1e308, 0.5, "", "x", "part-00000.parquet",
                "../../etc/passwd", "/etc/passwd", [], {}, [1, 2], {"a": 1}, "NaN", "0" * 64]


def mutate_json_text(rng: random.Random, text: str) -> tuple[str, str]:
    """One random edit of a JSON document (delete, replace, retype, add a key, duplicate or reorder list items), or
    a text-level one (deep nesting, invalid UTF-8, NaN literals, duplicate keys)."""
    kind = rng.random()
    if kind < 0.12:
        choice = rng.choice(["deep", "nan", "dupkey", "bom", "bad-utf8", "empty", "scalar", "huge-int"])
        if choice == "deep":
            depth = rng.choice([1000, 100000])
            return "[" * depth + "]" * depth, f"nested {depth} deep"
        if choice == "nan":
            return text.replace('"F": ', '"F": NaN, "x": ', 1), "NaN literal"
        if choice == "dupkey":
            return text.replace("{", '{"F": 99, ', 1), "duplicate key F"
        if choice == "bom":
            return "\ufeff" + text, "byte order mark"
        if choice == "bad-utf8":
            return text[:len(text) // 2] + "\udcff" + text[len(text) // 2:], "invalid UTF-8 byte"
        if choice == "empty":
            return "", "empty file"
        if choice == "scalar":
            return rng.choice(["null", "1", '"x"', "[]", "true"]), "not an object"
        return text.replace('"total_rows": ', '"total_rows": 1' + "0" * 5000 + ", \"y\": ", 1), "5000-digit int"
    doc = json.loads(text)
    paths = [p for p in _json_paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = rng.choice(["delete", "replace", "replace", "replace", "add", "dup", "swap", "nudge"])
    if action == "delete":
        del parent[last]
    elif action == "replace":
        parent[last] = rng.choice(_JSON_VALUES)
    elif action == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "shards", "F", "inputs"])] = rng.choice(_JSON_VALUES)
    elif action == "dup" and isinstance(parent, list):
        parent.insert(last, parent[last])
    elif action == "swap" and isinstance(parent, list) and len(parent) > 1:
        other = rng.randrange(len(parent))
        parent[last], parent[other] = parent[other], parent[last]
    elif isinstance(parent[last], int) and not isinstance(parent[last], bool):
        parent[last] += rng.choice([-1, 1, 10**9])
    else:
        parent[last] = rng.choice(_JSON_VALUES)
    shown = "/".join(map(str, path))
    return json.dumps(doc, indent=2, sort_keys=True), f"manifest {shown}: {action}"


# --------------------------------------------------------------------------------------------------------------
# Loaders under attack


@dataclass
class Target:
    """One loader: how to build its valid input, mutate it, load it, and judge a successful load."""

    name: str
    build: Callable[[Path], dict]  # workdir -> context (paths, reference values)
    mutate: Callable[[random.Random, dict, Path], tuple[str, bool]]  # -> (description, content may differ)
    load: Callable[[dict, Path], object]
    same: Callable[[dict, object], bool]  # a successful load returned the reference content
    error: Callable[[], type]
    names: Callable[[dict, Path], list[str]] = field(default=lambda ctx, trial: [])


def _npz_build(workdir: Path) -> dict:
    import numpy as np

    from stages.core.ogbench_data import write_npz

    rng = np.random.default_rng(0)
    rows, episode = 40, 20
    terminals = np.zeros(rows, bool)
    terminals[episode - 1::episode] = True
    arrays = {"observations": rng.normal(size=(rows, 28)).astype(np.float32),
              "actions": rng.uniform(-1, 1, size=(rows, 5)).astype(np.float32), "terminals": terminals,
              "qpos": rng.normal(size=(rows, 21)).astype(np.float32),
              "qvel": rng.normal(size=(rows, 20)).astype(np.float32)}
    path = workdir / "base.npz"
    write_npz(path, arrays)
    return {"bytes": path.read_bytes(), "arrays": arrays}


def _npz_mutate(rng: random.Random, ctx: dict, trial: Path) -> tuple[str, bool]:
    choice = rng.random()
    if choice < 0.45:
        data, what = mutate_bytes(rng, ctx["bytes"])
        structured = False
    elif choice < 0.7:
        data, what = mutate_zip_directory(rng, ctx["bytes"])
        structured = False
    else:
        data, what = mutate_npy_header(rng, ctx["bytes"])
        structured = True
    (trial / "data.npz").write_bytes(data)
    return what, structured


def _npz_same(ctx: dict, result) -> bool:
    import numpy as np

    arrays = result if isinstance(result, dict) else None
    if arrays is None:
        return True  # a RawSummary: the validator accepted it, which is what "valid" means here
    return set(arrays) == set(ctx["arrays"]) and all(np.array_equal(arrays[k], v) for k, v in ctx["arrays"].items())


def _validate_load(ctx: dict, trial: Path):
    from stages.core.ogbench_data import validate_raw_file

    return validate_raw_file(trial / "data.npz")


def _read_npz_load(ctx: dict, trial: Path):
    from stages.core.ogbench_data import read_npz

    return read_npz(trial / "data.npz")


_ENV = {}


def _training_load(ctx: dict, trial: Path):
    from stages.core.ogbench_data import load_training_data, make_task_env

    name = "cube-single-singletask-task2-v0"
    if name not in _ENV:
        _ENV[name] = make_task_env(name)
    load_training_data(trial / "data.npz", name, sparse=False, env=_ENV[name])


def _dataset_error() -> type:
    from stages.core.ogbench_data import DatasetFileError

    return DatasetFileError


SHARD_GEOMETRY = {"F": 2, "h": 2, "d": 2}
SHARD_INPUTS = {"dataset": "d" * 64, "prior": "p" * 64}


def _shards_build(workdir: Path) -> dict:
    import numpy as np

    from stages.core.shards import write_cache

    rng = np.random.default_rng(0)
    rows = 30
    x = rng.normal(size=(rows, 3, 4)).astype(np.float32)
    err = rng.uniform(0, 1e-6, size=rows).astype(np.float32)
    directory = workdir / "cache"
    write_cache(directory, [(np.arange(rows), x, err)], method="exact", inputs=SHARD_INPUTS, shard_rows=12,
                row_group_rows=5, **SHARD_GEOMETRY)
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    return {"files": files, "x": x}


def _shards_mutate(rng: random.Random, ctx: dict, trial: Path) -> tuple[str, bool]:
    directory = trial / "cache"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    files = dict(ctx["files"])
    choice = rng.random()
    structured = False
    if choice < 0.35:
        text, what = mutate_json_text(rng, files["manifest.json"].decode())
        files["manifest.json"] = text.encode("utf-8", "surrogateescape")
        structured = True
    elif choice < 0.75:
        name = rng.choice([n for n in files if n.endswith(".parquet")])
        files[name], what = mutate_bytes(rng, files[name])
        what = f"{name}: {what}"
        if rng.random() < 0.5:  # reseal: the manifest agrees with the damaged shard, so Parquet itself is attacked
            manifest = json.loads(files["manifest.json"])
            for info in manifest["shards"]:
                if info["file"] == name:
                    info["bytes"], info["sha256"] = len(files[name]), hashlib.sha256(files[name]).hexdigest()
            files["manifest.json"] = json.dumps(manifest).encode()
            what += " (manifest resealed)"
    elif choice < 0.85:
        files["manifest.json"], what = mutate_bytes(rng, files["manifest.json"])
        what = f"manifest.json: {what}"
    else:
        action = rng.choice(["drop shard", "extra shard", "drop manifest", "swap shards", "empty shard"])
        shard_names = sorted(n for n in files if n.endswith(".parquet"))
        if action == "drop shard":
            del files[rng.choice(shard_names)]
        elif action == "extra shard":
            files[f"part-{len(shard_names):05d}.parquet"] = files[shard_names[0]]
        elif action == "drop manifest":
            del files["manifest.json"]
        elif action == "swap shards":
            files[shard_names[0]], files[shard_names[1]] = files[shard_names[1]], files[shard_names[0]]
        else:
            files[rng.choice(shard_names)] = b""
        what = action
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return what, structured


def _shards_read(ctx: dict, trial: Path):
    from stages.core.shards import read_cache

    return read_cache(trial / "cache", inputs=SHARD_INPUTS, **SHARD_GEOMETRY).x


def _shards_iter(ctx: dict, trial: Path):
    import numpy as np

    from stages.core.shards import iter_cache

    parts = [batch.x for batch in iter_cache(trial / "cache", inputs=SHARD_INPUTS, **SHARD_GEOMETRY)]
    return np.concatenate(parts) if parts else np.empty((0, 3, 4), np.float32)


def _shards_verify(ctx: dict, trial: Path):
    from stages.core.shards import verify_cache

    verify_cache(trial / "cache", inputs=SHARD_INPUTS, **SHARD_GEOMETRY)


def _shards_same(ctx: dict, result) -> bool:
    import numpy as np

    return result is None or (result.shape == ctx["x"].shape and np.array_equal(result, ctx["x"]))


def _shards_error() -> type:
    from stages.core.shards import ShardCacheError

    return ShardCacheError


POLICY_METADATA = {"agent": "bc_flow", "config": {"h": 2, "F": 2}}


def _policy_params():
    import numpy as np

    rng = np.random.default_rng(0)
    return {"net": {"Dense_0": {"kernel": rng.normal(size=(6, 8)).astype(np.float32),
                                "bias": np.zeros(8, np.float32)},
                    "Dense_1": {"kernel": rng.normal(size=(8, 4)).astype(np.float32),
                                "bias": np.zeros(4, np.float32)}},
            "step": np.array(3, np.int32)}


def _policy_build(workdir: Path) -> dict:
    from stages.core.policy_file import save_policy

    path = workdir / "policy.msgpack"
    save_policy(path, _policy_params(), POLICY_METADATA)
    return {"bytes": path.read_bytes(), "params": _policy_params()}


def _reseal(body: bytes) -> bytes:
    from stages.core.policy_file import _HEADER, POLICY_FORMAT_VERSION, POLICY_MAGIC

    return _HEADER.pack(POLICY_MAGIC, POLICY_FORMAT_VERSION, len(body), hashlib.sha256(body).digest()) + body


def _mutate_payload(rng: random.Random, payload: dict) -> str:
    entries = payload["arrays"]
    entry = rng.choice(entries)
    choice = rng.choice(["dtype", "shape", "path", "raw", "entry", "metadata", "format", "arrays", "dup"])
    if choice == "dtype":
        entry[1] = rng.choice(["<f8", ">f4", "|O", "V4", "<U3", "f4,f4", "<M8[s]", "", "x" * 300, 5, None, "|b1",
                               "<i4", "<f2", "V9999999999"])
        return f"dtype {entry[1]!r}"
    if choice == "shape":
        entry[2] = rng.choice([[10**12], [2**62, 2**62], [-1], [], [0], None, "3", [1.5], [True, 48], [2**64 - 1],
                               [0, 10**18], list(reversed(entry[2]))])
        return f"shape {entry[2]!r}"
    if choice == "path":
        entry[0] = rng.choice([[], ["net"], "net", [1], ["net", "Dense_0"], ["net", "Dense_0", "kernel", "x"],
                               ["step", "x"], [""], None])
        return f"path {entry[0]!r}"
    if choice == "raw":
        entry[3] = rng.choice([b"", entry[3][:-1], entry[3] + b"\0", "text", None, 12, entry[3][::-1]])
        return "raw data replaced"
    if choice == "entry":
        index = entries.index(entry)
        entries[index] = rng.choice([[], None, "x", entry[:3], [*entry, 1], {"a": 1}])
        return "entry replaced"
    if choice == "metadata":
        payload["metadata"] = rng.choice(["", "[" * 100000 + "]" * 100000, "{", "[]", "null", 5, None, b"{}",
                                          json.dumps({"agent": "fql"}), "{\"a\": NaN}", "1" * 10000])
        return f"metadata {str(payload['metadata'])[:20]!r}"
    if choice == "format":
        payload["format"] = rng.choice(["", None, "rql-policy2", 1])
        return "format"
    if choice == "arrays":
        payload["arrays"] = rng.choice([None, [], {}, "x", [entries[0]] * 2, entries * 1])
        return "arrays replaced"
    entries.append(list(entry))
    return "duplicate entry"


def _policy_mutate(rng: random.Random, ctx: dict, trial: Path) -> tuple[str, bool]:
    import msgpack

    from stages.core.policy_file import _HEADER

    data = ctx["bytes"]
    choice = rng.random()
    structured = False
    if choice < 0.3:
        data, what = mutate_bytes(rng, data)
    elif choice < 0.45:
        magic, version, length, digest = _HEADER.unpack_from(data)
        field_name = rng.choice(["version", "length", "magic"])
        if field_name == "version":
            version = rng.choice([0, 2, 2**32 - 1])
        elif field_name == "length":
            length = rng.choice([0, length - 1, length + 1, 2**63, 2**64 - 1])
        else:
            magic = rng.choice([b"RQLPOLCZ", b"\0" * 8, b"PK\x03\x04\0\0\0\0"])
        data = _HEADER.pack(magic, version, length, digest) + data[_HEADER.size:]
        what = f"header {field_name}"
    elif choice < 0.7:
        body, what = mutate_bytes(rng, data[_HEADER.size:])
        data, what, structured = _reseal(body), f"body {what} (resealed)", True
    else:
        payload = msgpack.unpackb(data[_HEADER.size:], raw=False)
        what = _mutate_payload(rng, payload)
        data, what, structured = _reseal(msgpack.packb(payload, use_bin_type=True)), f"payload {what}", True
    (trial / "policy.msgpack").write_bytes(data)
    return what, structured


def _policy_load_template(ctx: dict, trial: Path):
    from stages.core.policy_file import load_policy

    return load_policy(trial / "policy.msgpack", template=ctx["params"], expected_metadata={"agent": "bc_flow"})


def _policy_load_plain(ctx: dict, trial: Path):
    from stages.core.policy_file import decode_policy

    return decode_policy((trial / "policy.msgpack").read_bytes(), source=str(trial / "policy.msgpack"))


def _policy_same(ctx: dict, result) -> bool:
    import jax
    import numpy as np

    try:
        pairs = zip(jax.tree_util.tree_leaves(result.params), jax.tree_util.tree_leaves(ctx["params"]), strict=True)
        return all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in pairs)
    except ValueError:
        return False


def _policy_error() -> type:
    from stages.core.policy_file import PolicyFileError

    return PolicyFileError


TARGETS = {
    "npz-validate": Target("npz-validate", _npz_build, _npz_mutate, _validate_load, _npz_same, _dataset_error,
                           lambda ctx, trial: ["data.npz"]),
    "npz-read": Target("npz-read", _npz_build, _npz_mutate, _read_npz_load, _npz_same, _dataset_error,
                       lambda ctx, trial: ["data.npz"]),
    "npz-training": Target("npz-training", _npz_build, _npz_mutate, _training_load, lambda ctx, r: True,
                           _dataset_error, lambda ctx, trial: ["data.npz"]),
    "shards-read": Target("shards-read", _shards_build, _shards_mutate, _shards_read, _shards_same, _shards_error,
                          lambda ctx, trial: ["cache"]),
    "shards-iter": Target("shards-iter", _shards_build, _shards_mutate, _shards_iter, _shards_same,
                          _shards_error, lambda ctx, trial: ["cache"]),
    "shards-verify": Target("shards-verify", _shards_build, _shards_mutate, _shards_verify, _shards_same,
                            _shards_error, lambda ctx, trial: ["cache"]),
    "policy-load": Target("policy-load", _policy_build, _policy_mutate, _policy_load_template, _policy_same,
                          _policy_error, lambda ctx, trial: ["policy.msgpack"]),
    "policy-decode": Target("policy-decode", _policy_build, _policy_mutate, _policy_load_plain, _policy_same,
                            _policy_error, lambda ctx, trial: ["policy.msgpack"]),
}


def _probe_load(ctx: dict, trial: Path):
    """The harness's own check (`probe_worker`): case 0 allocates beyond the limit, case 1 crashes the worker."""
    index = ctx["case"]
    if index == 0:
        return bytearray(MEMORY_HEADROOM * 4)
    if index == 1:
        os.abort()
    return None


def _probe_mutate(rng: random.Random, ctx: dict, trial: Path) -> tuple[str, bool]:
    return f"probe {ctx['case']}", True


PROBE = Target("probe", lambda workdir: {}, _probe_mutate, _probe_load, lambda ctx, r: True, _dataset_error)


def probe_worker(workdir: Path) -> list[Outcome]:
    """Two cases through a real worker: an allocation beyond the limit, then a crash (both must be reported)."""
    return fuzz_target("probe", 2, workdir=workdir)


# --------------------------------------------------------------------------------------------------------------
# Worker: runs cases, one JSON line per case


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_case(target: Target, ctx: dict, seed: int, index: int, trial: Path) -> Outcome:
    """Case ``index``: mutate, load under a time limit, judge."""
    rng = random.Random(f"{seed}/{target.name}/{index}")
    shutil.rmtree(trial, ignore_errors=True)
    trial.mkdir(parents=True)
    ctx["case"] = index
    try:
        what, structured = target.mutate(rng, ctx, trial)
    except Exception as exc:  # noqa: BLE001  (a bug of the harness, not of the loader: reported as such)
        return Outcome(target.name, index, "(mutation failed)", False, f"harness: {type(exc).__name__}: {exc}")
    error_type = target.error()
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        result = target.load(ctx, trial)
    except _Timeout:
        return Outcome(target.name, index, what, False, f"hang: no answer in {CASE_SECONDS:.0f} s")
    except error_type as exc:
        message = str(exc)
        if "\n" in message:
            return Outcome(target.name, index, what, False, f"multi-line {type(exc).__name__}: {message[:200]!r}")
        if not any(name in message for name in target.names(ctx, trial)):
            return Outcome(target.name, index, what, False, f"message names no file: {message[:200]!r}")
        return Outcome(target.name, index, what, True, f"{type(exc).__name__}")
    except BaseException as exc:  # noqa: BLE001  (this is what the fuzzing looks for)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        return Outcome(target.name, index, what, False,
                       f"{type(exc).__name__} at {where}: {str(exc)[:160]}".replace("\n", " "))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if not structured and not target.same(ctx, result):
        return Outcome(target.name, index, what, False, "loaded altered content without an error")
    return Outcome(target.name, index, what, True, "loaded")


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--stop", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    target = PROBE if args.target == "probe" else TARGETS[args.target]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = target.build(workdir)
    signal.signal(signal.SIGALRM, _alarm)
    # warm up (imports, the env of npz-training), then cap the address space: allocations a header asks for fail
    with contextlib.suppress(BaseException):
        run_case(target, ctx, args.seed, -1, workdir / "trial")
    limit = _address_space() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout
    for index in range(args.start, args.stop):
        out.write(json.dumps({"start": index}) + "\n")
        out.flush()
        outcome = run_case(target, ctx, args.seed, index, workdir / "trial")
        out.write(json.dumps(outcome.__dict__) + "\n")
        out.flush()


# --------------------------------------------------------------------------------------------------------------
# Parent: drives workers, survives hangs and crashes


def fuzz_target(name: str, cases: int, seed: int = 0, workdir: Path | None = None,
                progress: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run cases ``0 .. cases-1`` of loader ``name``; every case gets an Outcome (hangs and crashes included)."""
    outcomes: list[Outcome] = []
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-")) if owned else workdir
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               JAX_PLATFORMS="cpu", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1", ARROW_NUM_THREADS="1")
    start = 0
    try:
        while start < cases:
            command = [sys.executable, "-m", "benchmarks.hardening.fuzz", "--worker", "--target", name,
                       "--seed", str(seed), "--start", str(start), "--stop", str(cases), "--workdir", str(workdir)]
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True)
            current, deadline, buffer = None, time.monotonic() + 120 + CASE_SECONDS, ""
            try:
                while True:
                    ready, _, _ = select.select([process.stdout], [], [], 1.0)
                    if ready:
                        line = process.stdout.readline()
                        if not line:
                            break
                        record = json.loads(line)
                        if "start" in record:
                            current, deadline = record["start"], time.monotonic() + CASE_SECONDS * 3
                        else:
                            outcomes.append(Outcome(**record))
                            current = None
                            if progress and len(outcomes) % 100 == 0:
                                progress(f"fuzz {name}: {len(outcomes)}/{cases}")
                    if time.monotonic() > deadline:
                        os.killpg(process.pid, signal.SIGKILL)
                        buffer = "hang: the worker did not answer (killed)"
                        break
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                stderr = process.stderr.read() if process.stderr else ""
                process.wait()
            done = {o.index for o in outcomes}
            if current is None:
                if len(done) < cases and start not in done and not any(i >= start for i in done):
                    tail = stderr.strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"fuzz worker for {name} failed to start: {tail[0]}")
                start = max(done) + 1 if done else cases
                continue
            reason = buffer or f"crash: worker exited {process.returncode} ({_signal_name(process.returncode)})"
            outcomes.append(Outcome(name, current, _describe(name, seed, current, workdir), False, reason))
            start = current + 1
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    return sorted(outcomes, key=lambda o: o.index)


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit {code}"


def _describe(name: str, seed: int, index: int, workdir: Path) -> str:
    """The mutation of a case whose worker died (rebuilt without loading)."""
    try:
        target = PROBE if name == "probe" else TARGETS[name]
        ctx = target.build(workdir / "describe")
        trial = workdir / "describe" / "trial"
        trial.mkdir(parents=True, exist_ok=True)
        return target.mutate(random.Random(f"{seed}/{name}/{index}"), ctx, trial)[0]
    except Exception as exc:  # noqa: BLE001
        return f"(mutation not rebuilt: {exc})"


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        worker_main(sys.argv[1:])
    else:
        parser = argparse.ArgumentParser(description="fuzz the loaders (see benchmarks/hardening.py)")
        parser.add_argument("--cases", type=int, default=200)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("targets", nargs="*", default=list(TARGETS))
        options = parser.parse_args()
        for target_name in options.targets:
            results = fuzz_target(target_name, options.cases, options.seed)
            bad = [o for o in results if not o.ok]
            print(f"{target_name}: {len(results)} cases, {len(bad)} failures")
            for o in bad:
                print(f"  #{o.index} {o.mutation}: {o.detail}")
