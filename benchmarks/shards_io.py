"""Reversal-cache I/O benchmark: write and read throughput, shard size per 1M rows, peak RSS.

Synthetic but realistic rows: a smooth action chunk (a clipped random walk), a Gaussian x_0, and the grid in between
interpolated with a small noise that vanishes at both ends, as the flow-reversed trajectories look (a pool of four
distinct 8k-row batches, cycled, so generating data does not count as writing). Every phase
runs in a fresh interpreter so its peak RSS (``resource.getrusage``) is its own; reads follow the write, so the
files are in the page cache (this measures decoding, not the disk).

    .venv/bin/python benchmarks/shards_io.py                    # 300k rows, F=10, h=5, d=5 (< 1 min)
    .venv/bin/python benchmarks/shards_io.py --rows 5000000     # a large file set: streaming RSS stays flat
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_pool(
    F: int, h: int, d: int, batch: int, count: int = 4, seed: int = 0
) -> list[tuple[np.ndarray, ...]]:
    """``count`` distinct batches of (x (B, F+1, h*d), round-trip errors (B,))."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, F + 1, dtype=np.float32)[None, :, None]
    pool = []
    for _ in range(count):
        first = rng.uniform(-1, 1, size=(batch, 1, d)).astype(np.float32)
        steps = rng.normal(0, 0.05, size=(batch, h, d)).astype(np.float32)
        chunk = np.clip(first + np.cumsum(steps, axis=1), -1, 1).reshape(batch, 1, h * d)
        x0 = rng.standard_normal(size=(batch, 1, h * d), dtype=np.float32)
        wiggle = (
            rng.standard_normal(size=(batch, F + 1, h * d), dtype=np.float32) * np.float32(0.05) * t * (1 - t)
        )
        x = (1 - t) * x0 + t * chunk + wiggle
        errors = rng.random(batch, dtype=np.float32) * np.float32(1e-5)
        pool.append((x, errors))
    return pool


def synthetic_batches(
    rows: int, h: int, pool: list[tuple[np.ndarray, ...]]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches of (row indices, x, errors) cycling through ``pool`` (generation costs nothing while timing).

    Parquet compresses each ~1 MB page on its own, so repeating 8k-row batches does not help compression.
    """
    batch = pool[0][0].shape[0]
    start = 0
    while start < rows:
        n = min(batch, rows - start)
        x, errors = pool[(start // batch) % len(pool)]
        # Chunk starts skip the last h-1 steps of each 1000-step episode, as in the dataset.
        index = np.arange(start, start + n, dtype=np.int64)
        yield index + (index // (1000 - h + 1)) * (h - 1), x[:n], errors[:n]
        start += n


def warm_up() -> None:
    """Pay pyarrow's one-off lazy imports (its pandas shim) before measuring time and the RSS baseline."""
    import pyarrow as pa

    pa.array(np.zeros(4, np.float32)).to_numpy(zero_copy_only=True)


def phase_write(args: argparse.Namespace) -> dict:
    from stages.core import shards

    warm_up()
    pool = synthetic_pool(args.F, args.h, args.d, args.batch)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    manifest = shards.write_cache(
        args.cache,
        synthetic_batches(args.rows, args.h, pool),
        F=args.F,
        h=args.h,
        d=args.d,
        method="exact",
        inputs={"dataset": "0" * 64, "prior": "1" * 64},
        shard_rows=args.shard_rows,
        row_group_rows=args.row_group_rows,
    )
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "bytes": sum(s.bytes for s in manifest.shards),
        "shards": len(manifest.shards),
        "baseline_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_read(args: argparse.Namespace) -> dict:
    from stages.core import shards

    warm_up()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    checksum = 0.0
    rows = 0
    if args.phase == "read-all":
        cache = shards.read_cache(args.cache, verify_sha256=args.verify)
        rows = cache.rows.shape[0]
        checksum = float(cache.x[:, -1].sum(dtype=np.float64))
    else:
        for batch in shards.iter_cache(args.cache, verify_sha256=args.verify):
            rows += batch.rows.shape[0]
            checksum += float(batch.x[:, -1].sum(dtype=np.float64))  # touch the data
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "rows": rows,
        "checksum": checksum,
        "baseline_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_phase(args: argparse.Namespace, phase: str, verify: bool = True) -> dict:
    """Run one phase in a fresh interpreter and return its JSON report."""
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--cache",
        str(args.cache),
        "--rows",
        str(args.rows),
        "--F",
        str(args.F),
        "--h",
        str(args.h),
        "--d",
        str(args.d),
        "--batch",
        str(args.batch),
        "--shard-rows",
        str(args.shard_rows),
        "--row-group-rows",
        str(args.row_group_rows),
    ]
    if not verify:
        cmd.append("--no-verify")
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--F", type=int, default=10)
    parser.add_argument("--h", type=int, default=5)
    parser.add_argument("--d", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8192, help="rows per batch handed to the writer")
    parser.add_argument("--shard-rows", type=int, default=131_072)
    parser.add_argument("--row-group-rows", type=int, default=16_384)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir, deleted)"
    )
    parser.add_argument("--phase", choices=["write", "read-stream", "read-all"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase is not None:
        sys.path.insert(0, str(ROOT))
        report = phase_write(args) if args.phase == "write" else phase_read(args)
        print(json.dumps(report))
        return

    workdir = Path(tempfile.mkdtemp(prefix="shards_io-", dir=args.dir))
    args.cache = workdir / "cache"
    try:
        width = (args.F + 1) * args.h * args.d
        raw_mb = args.rows * (width * 4 + 8 + 4) / 1e6
        print(
            f"rows {args.rows:,}  F={args.F} h={args.h} d={args.d}  ({width} float32/row, {raw_mb:,.0f} MB raw)  "
            f"shard_rows {args.shard_rows:,}  row groups {args.row_group_rows:,}  pyarrow zstd level 1 + "
            "byte_stream_split"
        )
        w = run_phase(args, "write")
        per_million = w["bytes"] / args.rows * 1e6 / 1e6
        print(
            f"write        {args.rows / w['seconds']:>12,.0f} rows/s  {raw_mb / w['seconds']:>7,.0f} MB/s raw  "
            f"{w['shards']} shards, {w['bytes'] / 1e6:,.0f} MB on disk ({w['bytes'] / 1e6 / raw_mb:.3f} of raw), "
            f"{per_million:,.0f} MB per 1M rows;  peak RSS {w['peak_rss_mb']:,.0f} MB "
            f"(baseline {w['baseline_rss_mb']:,.0f}, with a {args.batch * 4:,}-row synthetic pool)"
        )
        for phase, verify, label in (
            ("read-stream", True, "stream+sha"),
            ("read-stream", False, "stream"),
            ("read-all", True, "all+sha"),
        ):
            r = run_phase(args, phase, verify)
            assert r["rows"] == args.rows
            print(
                f"{label:<12} {r['rows'] / r['seconds']:>12,.0f} rows/s  {raw_mb / r['seconds']:>7,.0f} MB/s raw  "
                f"{w['bytes'] / 1e6 / r['seconds']:>7,.0f} MB/s file;  peak RSS {r['peak_rss_mb']:,.0f} MB "
                f"(baseline {r['baseline_rss_mb']:,.0f})"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
