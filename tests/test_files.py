"""stages/core/files.py: atomic writes leave the old file or the new one, never a partial one; the two JSON forms."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pytest

from stages.core import files


def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    files.atomic_write_bytes(path, b"first")
    files.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"), files.atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new")
        assert files.temporaries(path) == [tmp]
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and files.temporaries(path) == []


def test_sha256_of_a_file_reads_it_in_blocks(tmp_path):
    path = tmp_path / "big"
    data = os.urandom(3 * (8 << 20) + 5)  # several blocks and a partial one
    path.write_bytes(data)
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_the_two_json_forms_keep_their_bytes():
    payload = {"b": [1, 2.5], "a": {"é": True}}
    assert files.pretty_json(payload) == '{\n  "a": {\n    "\\u00e9": true\n  },\n  "b": [\n    1,\n    2.5\n  ]\n}\n'
    assert files.compact_json(payload) == '{"a":{"\\u00e9":true},"b":[1,2.5]}'
    assert files.compact_json({"n": np.int64(3), "x": np.float32(0.5)}) == '{"n":3,"x":0.5}'
    with pytest.raises(ValueError):
        files.compact_json({"x": math.nan})
    with pytest.raises(ValueError):
        files.pretty_json({"x": math.nan}, allow_nan=False)
    assert files.pretty_json({"x": math.nan}) == '{\n  "x": NaN\n}\n'
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        files.compact_json({"x": object()})


def test_write_json_writes_the_pretty_form_atomically(tmp_path):
    files.write_json(tmp_path / "r.json", {"z": 1, "a": 2})
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 2,\n  "z": 1\n}\n'
