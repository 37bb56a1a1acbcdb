"""Reversal-cache benchmark: reversal throughput and round-trip error (exact vs euler) through a trained prior,
and the peak RSS of the real `reverse` stage and of reading its shards on a dataset `--scale` times the default.

    .venv/bin/python benchmarks/reversal_cache.py --dataset data/datasets/cube-single-play-v0/cube-single-play-v0.npz

Steps, each measured in this one run:
1. train a BC flow prior (the `prior` stage's config at the default params) for `--prior-steps` steps;
2. reverse `--rows` chunks through it with `exact` and with `euler`: chunks/s and the round-trip error
   max |sampler(x_0) - chunk| (quantiles);
3. build a dataset `--scale` times the given one (its episodes repeated), run `python -m stages.reverse` on it in a
   fresh process and report its wall time, chunks/s, shard bytes per 1M rows and peak RSS;
4. read the shards back in fresh processes (streaming, and all at once): rows/s, MB/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASET = "cube-single-play-v0"

PEAK_RSS = "float(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024"
# ru_maxrss is inherited across fork + exec on Linux, so children report the kernel's own high-water mark instead.
STAGE_SCRIPT = f"""
import atexit, runpy, sys
atexit.register(lambda: print('peak_rss_mb', {PEAK_RSS}, file=sys.stderr))
sys.argv = ['stages.reverse'] + sys.argv[1:]
runpy.run_module('stages.reverse', run_name='__main__')
"""
READ_SCRIPT = f"""
import sys, time
from stages.core import shards
start = time.perf_counter()
rows = 0
if sys.argv[2] == "stream":
    for batch in shards.iter_cache(sys.argv[1]):
        rows += batch.rows.size
else:
    rows = shards.read_cache(sys.argv[1]).rows.size
elapsed = time.perf_counter() - start
print(rows, elapsed, {PEAK_RSS})
"""


def load_uptime() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def trained_prior(params, data, steps: int):
    import jax

    from stages.agent_setup import prior_config
    from stages.core import batches, training_loop
    from stages.core.agents import bc_flow

    config = prior_config(params, DATASET, data.obs_dim, data.action_dim)
    per_call = 100
    schedule = training_loop.Schedule(total_steps=steps, updates_per_call=per_call, log_every=steps,
                                      checkpoint_every=steps)
    started = time.perf_counter()
    state = training_loop.run(bc_flow.init(config, jax.random.PRNGKey(0)), batches.to_device(data.arrays),
                              bc_flow.make_update(config, per_call), schedule, progress=False)
    print(f"prior: {steps} BC steps in {time.perf_counter() - started:.1f} s")
    return config, bc_flow.policy_params(state)


def reversal_speed(config, prior, data, rows: int, batch_size: int, params) -> dict:
    import jax

    from stages.core import batches, cache_build

    device = batches.to_device({k: v[:rows] for k, v in data.arrays.items()} | {
        "terminals": np.concatenate([data.arrays["terminals"][: rows - 1], [1.0]]).astype(np.float32)})
    results = {}
    for method in ("exact", "euler"):
        warm = list(cache_build.iter_reversed(config, prior, device, batch_size, method, params.reverse.iterations,
                                              params.reverse.tolerance))
        jax.block_until_ready(warm[-1][1])
        started = time.perf_counter()
        blocks = list(cache_build.iter_reversed(config, prior, device, batch_size, method, params.reverse.iterations,
                                                params.reverse.tolerance))
        elapsed = time.perf_counter() - started
        errors = np.concatenate([b[2] for b in blocks])
        results[method] = {"chunks_per_s": rows / elapsed, "median": float(np.median(errors)),
                           "p99": float(np.quantile(errors, 0.99)), "max": float(errors.max())}
    return results


def scaled_dataset(source: Path, scale: int, target: Path) -> int:
    from stages.core import ogbench_data

    raw = ogbench_data.read_npz(source)
    big = {key: np.concatenate([value] * scale) for key, value in raw.items()}
    ogbench_data.write_npz(target / f"{DATASET}.npz", big)
    val = ogbench_data.read_npz(source.with_name(source.name.replace(".npz", "-val.npz")))
    ogbench_data.write_npz(target / f"{DATASET}-val.npz", val)
    return int(big["terminals"].size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "data" / "datasets" / DATASET / f"{DATASET}.npz")
    parser.add_argument("--prior-steps", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=20000, help="chunks for the exact-vs-euler comparison")
    parser.add_argument("--scale", type=int, default=10, help="stage run on a dataset this many times larger")
    args = parser.parse_args()
    if not args.dataset.is_file():
        raise SystemExit(f"{args.dataset}: no dataset; run `dvc repro download@{DATASET}` first or pass --dataset")

    os.environ.setdefault("MUJOCO_GL", "egl")
    from stages.params import load_params
    from stages.task_data import load_dataset_data

    print(f"load average at start: {load_uptime()}")
    params = load_params(ROOT / "params.yaml")
    data = load_dataset_data(DATASET, folder=args.dataset.parent)
    config, prior = trained_prior(params, data, args.prior_steps)
    speed = reversal_speed(config, prior, data, min(args.rows, data.size), params.reverse.batch_size, params)
    for method, figures in speed.items():
        print(f"reverse {method:5s}: {figures['chunks_per_s']:8.0f} chunks/s; round-trip error median "
              f"{figures['median']:.2e}, p99 {figures['p99']:.2e}, max {figures['max']:.2e}")

    from stages.core import policy_file

    work = Path(tempfile.mkdtemp(prefix="reversal-bench-"))
    try:
        folder = work / "data" / "datasets" / DATASET
        folder.mkdir(parents=True)
        rows = scaled_dataset(args.dataset, args.scale, folder)
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        policy_file.save_policy(work / "data" / "priors" / DATASET / "policy.msgpack", prior,
                                {"algorithm": "bc_flow", "dataset": DATASET})
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        started = time.perf_counter()
        stage = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, "--dataset", DATASET, "--no-progress"], cwd=work,
                               env=env, check=True, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        stage_rss = float(stage.stderr.rsplit("peak_rss_mb", 1)[1].split()[0])
        cache = work / "data" / "reversed" / DATASET
        manifest = json.loads((cache / "manifest.json").read_text())
        shard_bytes = sum(s["bytes"] for s in manifest["shards"])
        print(f"reverse stage on {rows} rows ({args.scale}x the dataset, {params.reverse.method}): {elapsed:.1f} s "
              f"({rows / elapsed:.0f} chunks/s incl. start-up), peak RSS {stage_rss:.0f} MB")
        print(f"shards: {len(manifest['shards'])} files, {shard_bytes / 1e6:.0f} MB = "
              f"{shard_bytes / rows * 1e6 / 1e9:.2f} GB per 1M rows")
        raw_mb = rows * manifest["row_width"] * 4 / 1e6
        for mode in ("stream", "all"):
            out = subprocess.run([sys.executable, "-c", READ_SCRIPT, str(cache), mode], cwd=work, env=env,
                                 check=True, capture_output=True, text=True).stdout.split()
            read_rows, seconds, rss = int(out[0]), float(out[1]), float(out[2])
            print(f"read ({mode:6s}): {read_rows / seconds:9.0f} rows/s, {raw_mb / seconds:6.0f} MB/s (raw float32), "
                  f"peak RSS {rss:.0f} MB (cache {raw_mb:.0f} MB raw)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {load_uptime()}")


if __name__ == "__main__":
    main()
