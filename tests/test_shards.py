"""The reversal cache storage: round trip, byte stability, fixed shard sizes, every integrity error, atomicity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core import shards as S
from stages.core.files import sha256_file

F, H, D = 3, 2, 2
WIDTH = (F + 1) * H * D
INPUTS = {"dataset": "d" * 64, "prior": "p" * 64}


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with gaps (as chunk starts near episode ends are skipped), a smooth-ish grid, small errors."""
    rng = np.random.default_rng(seed)
    rows = np.cumsum(rng.integers(1, 3, size=n)).astype(np.int64)
    chunk = rng.uniform(-1, 1, size=(n, 1, H * D))
    noise = rng.normal(size=(n, 1, H * D))
    t = np.linspace(0, 1, F + 1)[None, :, None]
    x = ((1 - t) * noise + t * chunk).astype(np.float32)
    err = (rng.random(n) * 1e-5).astype(np.float32)
    return rows, x, err


def batches(rows, x, err, size: int):
    for i in range(0, rows.shape[0], size):
        yield rows[i : i + size], x[i : i + size], err[i : i + size]


def write(directory: Path, data, *, batch: int = 64, shard_rows: int = 100, row_group_rows: int = 32, **kw):
    args = {"F": F, "h": H, "d": D, "method": "exact", "inputs": INPUTS}
    args.update(shard_rows=shard_rows, row_group_rows=row_group_rows, **kw)
    return S.write_cache(directory, batches(*data, batch), **args)


@pytest.fixture
def data():
    return make_data(250)


@pytest.fixture
def cache(tmp_path, data):
    directory = tmp_path / "cache"
    write(directory, data)
    return directory


def rewrite_manifest(directory: Path, **changes) -> None:
    path = directory / S.MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


# ---------------------------------------------------------------------------------------------------------------


def test_round_trip_exact_values_and_order(cache, data):
    rows, x, err = data
    got = S.read_cache(cache, inputs=INPUTS, F=F, h=H, d=D, method="exact")
    assert got.x.shape == (250, F + 1, H * D) and got.x.dtype == np.float32
    np.testing.assert_array_equal(got.rows, rows)
    np.testing.assert_array_equal(got.x, x)
    np.testing.assert_array_equal(got.roundtrip_error, err)
    assert got.manifest.total_rows == 250
    assert got.manifest.roundtrip_error["max"] == pytest.approx(float(err.max()))

    streamed = list(S.iter_cache(cache, batch_rows=40))
    np.testing.assert_array_equal(np.concatenate([b.rows for b in streamed]), rows)
    np.testing.assert_array_equal(np.concatenate([b.x for b in streamed]), x)
    np.testing.assert_array_equal(np.concatenate([b.roundtrip_error for b in streamed]), err)
    # Batches are at most batch_rows and never straddle shards (100 + 100 + 50 rows).
    assert [(b.shard, b.rows.shape[0]) for b in streamed] == [
        *[("part-00000.parquet", n) for n in (40, 40, 20)],
        *[("part-00001.parquet", n) for n in (40, 40, 20)],
        ("part-00002.parquet", 40),
        ("part-00002.parquet", 10),
    ]
    # Streamed arrays are views of Arrow buffers, not copies.
    assert all(not b.x.flags.owndata and not b.rows.flags.owndata for b in streamed)


def test_flat_x_and_jax_like_inputs_accepted(tmp_path, data):
    rows, x, err = data
    flat = (rows, x.reshape(rows.shape[0], WIDTH), err.astype(np.float64))
    write(tmp_path / "flat", flat)
    np.testing.assert_array_equal(S.read_cache(tmp_path / "flat").x, x)


def test_fixed_list_offsets_handled():
    """A sliced FixedSizeListArray must give the slice's values (``.values`` would ignore the offset)."""
    values = pa.array(np.arange(20, dtype=np.float32))
    sliced = pa.FixedSizeListArray.from_arrays(values, 4).slice(2, 2)
    got = S._column_numpy(pa.chunked_array([sliced]), fixed_list=True)
    np.testing.assert_array_equal(got, np.arange(8, 16, dtype=np.float32))
    two = S._column_numpy(pa.chunked_array([sliced, sliced.slice(1, 1)]), fixed_list=True)
    np.testing.assert_array_equal(two, np.r_[np.arange(8, 16), np.arange(12, 16)].astype(np.float32))


def test_byte_identical_whatever_the_batching(tmp_path, data):
    a = write(tmp_path / "a", data, batch=7)
    b = write(tmp_path / "b", data, batch=250, inputs=dict(reversed(list(INPUTS.items()))))
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["manifest.json"] + [f"part-0000{i}.parquet" for i in range(3)]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_fixed_shard_sizes(cache):
    manifest = S.read_manifest(cache)
    assert [s.rows for s in manifest.shards] == [100, 100, 50]
    for info in manifest.shards:
        meta = pq.ParquetFile(cache / info.file).metadata
        assert meta.num_rows == info.rows
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == (
            [32, 32, 32, 4] if info.rows == 100 else [32, 18]
        )
        assert meta.row_group(0).column(1).compression == "ZSTD"


def test_empty_cache(tmp_path):
    empty = (np.zeros(0, np.int64), np.zeros((0, F + 1, H * D), np.float32), np.zeros(0, np.float32))
    write(tmp_path / "e", empty)
    got = S.read_cache(tmp_path / "e")
    assert got.x.shape == (0, F + 1, H * D) and got.manifest.shards == ()


# ---------------------------------------------------------------------------------------------------------------
# Integrity errors


def test_missing_shard(cache):
    (cache / "part-00001.parquet").unlink()
    with pytest.raises(S.ShardCacheError, match=r"part-00001\.parquet is missing"):
        S.read_cache(cache)
    with pytest.raises(S.ShardCacheError, match=r"part-00001\.parquet is missing"):
        S.iter_cache(cache)  # checked before the first batch


def test_corrupt_bytes(cache):
    path = cache / "part-00001.parquet"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(S.ShardCacheError, match=r"part-00001\.parquet sha256 [0-9a-f]{64} != manifest"):
        S.read_cache(cache)
    with pytest.raises(S.ShardCacheError, match=r"part-00001\.parquet sha256"):
        S.verify_cache(cache)


def test_corrupt_data_page_caught_without_sha256(cache):
    """With the sha256 pass off, Parquet page checksums still catch a flipped byte inside x's values."""
    path = cache / "part-00001.parquet"
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    blob = bytearray(path.read_bytes())
    blob[column.data_page_offset + column.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(S.ShardCacheError, match=r"part-00001\.parquet: read failed .*CRC"):
        S.read_cache(cache, verify_sha256=False)


def test_truncated_shard(cache):
    path = cache / "part-00002.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(
            S.ShardCacheError, match=r"part-00002\.parquet has \d+ bytes, manifest says \d+: truncated"
        ):
            S.read_cache(cache, verify_sha256=verify)


def test_unreadable_parquet_named(cache):
    """A file whose manifest entry was also rewritten (so size and sha agree) but is not Parquet."""
    path = cache / "part-00000.parquet"
    path.write_bytes(b"not parquet at all")
    raw = json.loads((cache / S.MANIFEST_NAME).read_text())
    raw["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / S.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(S.ShardCacheError, match=r"part-00000\.parquet is not a readable Parquet file"):
        S.read_cache(cache)


def test_manifest_schema_version(cache):
    rewrite_manifest(cache, schema_version=S.SCHEMA_VERSION + 1)
    with pytest.raises(S.ShardCacheError, match=r"manifest\.json: schema version 2 != supported 1"):
        S.read_cache(cache)


def test_shard_schema_version(cache):
    """A shard written under another schema version is refused even if the manifest was patched to match."""
    path = cache / "part-00000.parquet"
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"rql.schema_version"] = b"0"
    pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd")
    raw = json.loads((cache / S.MANIFEST_NAME).read_text())
    raw["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / S.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(S.ShardCacheError, match=r"part-00000\.parquet schema version '0' != supported 1"):
        S.read_cache(cache)


def test_row_count_mismatch(cache):
    rewrite_manifest(cache, total_rows=251)
    with pytest.raises(S.ShardCacheError, match=r"total_rows 251 != sum of shard rows 250"):
        S.read_cache(cache)


def test_stale_extra_shard(cache):
    (cache / "part-00007.parquet").write_bytes((cache / "part-00000.parquet").read_bytes())
    with pytest.raises(S.ShardCacheError, match=r"part-00007\.parquet is not listed in manifest\.json"):
        S.read_cache(cache)


def test_wrong_input_hash(cache):
    expected = {"dataset": INPUTS["dataset"], "prior": "e" * 64}
    with pytest.raises(
        S.ShardCacheError,
        match=r"manifest input hash 'prior' p{64} != expected e{64}: rebuild the cache \(dvc repro reverse\)",
    ):
        S.read_cache(cache, inputs=expected, rebuild_hint="rebuild the cache (dvc repro reverse)")
    with pytest.raises(S.ShardCacheError, match=r"manifest has no input hash 'actor'"):
        S.verify_cache(cache, inputs={"actor": "0" * 64})


@pytest.mark.parametrize(("field", "value"), [("F", F + 1), ("h", H + 3), ("d", D - 1), ("method", "euler")])
def test_wrong_geometry_or_method(cache, field, value):
    with pytest.raises(
        S.ShardCacheError, match=rf"manifest {field} '?\w+'? != expected '?{value}'?: rebuild"
    ):
        S.read_cache(cache, **{field: value})


def test_not_a_cache(tmp_path):
    with pytest.raises(S.ShardCacheError, match="does not exist"):
        S.read_cache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.ShardCacheError, match=r"has no manifest\.json"):
        S.read_cache(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# Writer contract and atomicity


def test_writer_rejects_bad_input(tmp_path, data):
    rows, x, err = data
    with pytest.raises(ValueError, match="strictly increasing"):
        S.write_cache(
            tmp_path / "c",
            [(rows[:10], x[:10], err[:10]), (rows[5:15], x[5:15], err[5:15])],
            F=F,
            h=H,
            d=D,
            method="exact",
            inputs=INPUTS,
            shard_rows=8,
        )
    with pytest.raises(ValueError, match=r"\(F\+1\)\*h\*d = 16"):
        S.write_cache(
            tmp_path / "c",
            [(rows[:10], x[:10, :2], err[:10])],
            F=F,
            h=H,
            d=D,
            method="exact",
            inputs=INPUTS,
            shard_rows=8,
        )
    with pytest.raises(ValueError, match="method must be one of"):
        write(tmp_path / "c", data, method="rk4")
    assert not (tmp_path / "c").exists()
    assert os.listdir(tmp_path) == []  # failed writes leave nothing behind


def test_existing_directory_needs_overwrite(tmp_path, data):
    write(tmp_path / "c", data)
    with pytest.raises(FileExistsError, match="already exists"):
        write(tmp_path / "c", data)
    small = make_data(10, seed=1)
    write(tmp_path / "c", small, overwrite=True)
    np.testing.assert_array_equal(S.read_cache(tmp_path / "c").rows, small[0])
    assert os.listdir(tmp_path) == ["c"]


def test_exception_mid_write_leaves_nothing(tmp_path, data):
    def failing():
        yield from list(batches(*data, 64))[:3]
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        S.write_cache(tmp_path / "c", failing(), F=F, h=H, d=D, method="exact", inputs=INPUTS, shard_rows=50)
    assert os.listdir(tmp_path) == []


def test_killed_mid_write_leaves_no_complete_looking_dir(tmp_path):
    """A writer process killed hard after two full shards: no target directory; the leftover is cleaned next time."""
    target = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from stages.core import shards as S
        seen = [0]
        def progress(n):
            seen[0] += n
            if seen[0] >= 120:
                os._exit(7)
        def gen():
            for i in range(20):
                yield np.arange(i * 10, i * 10 + 10), np.zeros((10, {F + 1}, {H * D}), np.float32), np.zeros(10)
        S.write_cache({str(target)!r}, gen(), F={F}, h={H}, d={D}, method="euler", inputs={{}},
                      shard_rows=50, row_group_rows=10, progress=progress)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=Path(__file__).parents[1], capture_output=True
    )
    assert proc.returncode == 7, proc.stderr.decode()
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".cache.partial-")
    assert sorted(os.listdir(leftovers[0])) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    with pytest.raises(S.ShardCacheError, match=r"has no manifest\.json"):
        S.read_cache(leftovers[0])
    write(target, make_data(20))
    assert os.listdir(tmp_path) == ["cache"]
