"""Update speed: this CPU's float32 matmul rate and the agents' jitted updates, measured side by side in one run.

(a) float32 matmul rate (GFLOP/s): a square 2048 matmul, the critic-shaped (B*E, 512) x (512, 512) and the batched
    (E, B, 512) x (E, 512, 512), each a chain of matmuls in one jitted call, best of several. The reference rate is
    the best of all of them, before and after the updates and of the probes below (the hardest bar to reach).
(b) the RQL update at the paper configuration: 4x512 MLPs, ensemble 10, F = 10, batch 256, h = 5;
(c) the default configuration of params.yaml (first dataset, its preset): RQL with the online reversal of
    `agent.reversal_method` and with the other method, FQL and BC-flow.

Data are synthetic, shaped like cube-single (obs 28, d = 5, 100k rows, 1000-row episodes). Each update is compiled
by a first call, then `--rounds` rounds each time a matmul probe ((2560, 512) x (512, 512), ~0.1 s) and one call of
K updates (one lax.scan) with block_until_ready; the best call gives ms/update. "paired" is the median over rounds
of (update GFLOP/s) / (probe GFLOP/s of the same round), robust to other load on the shared machine.

FLOPs per update: "matmul" counts 2*M*N*K of every dot in the update's jaxpr after dead-code elimination, scan bodies
times their length (XLA's cost analysis counts a loop body once, so it misses F - 1 of the reversal's F actor calls;
its figure, elementwise operations included, is printed too). A while loop (the exact reversal's fixed point) is
counted once: that row's figures are lower bounds. The fractions use the matmul count. "cores" is process CPU time
over wall time during the timed calls (2 = both cores busy; ~1 when the VM gets one core's worth).

Ceiling: every dot of the update is then timed alone, per distinct (lhs shape, rhs shape, dimension numbers)
signature (one jitted call of many such dots on distinct operands), and the update's dots are summed at those
rates ("dots ms"). That is the time of the update's matrix
products with everything else (GELU, LayerNorm, Adam, noise, the reversal's adds) free, so "ceiling" = matmul
FLOPs / dots ms / reference rate bounds the "of matmul" fraction any implementation of the same computation can
reach here; "of ceil" = dots ms / update ms says how much of the update's time the products themselves take.

    .venv/bin/python benchmarks/update_speed.py                 # everything, ~2-4 minutes
    .venv/bin/python benchmarks/update_speed.py --only paper rql
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from stages.agent_setup import run_spec
from stages.core import batches
from stages.core.agents import rql
from stages.params import load_params

OBS_DIM, ACTION_DIM, ROWS, EPISODE = 28, 5, 100_000, 1000
PROBE_SHAPE, PROBE_REPS = (2560, 512, 512), 12


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def synthetic_dataset(seed: int = 0) -> batches.DeviceDataset:
    rs = np.random.RandomState(seed)
    obs = rs.randn(ROWS, OBS_DIM).astype(np.float32)
    terminals = np.zeros(ROWS, np.float32)
    terminals[EPISODE - 1 :: EPISODE] = 1
    return batches.to_device(
        {
            "observations": obs,
            "actions": rs.uniform(-1, 1, (ROWS, ACTION_DIM)).astype(np.float32),
            "rewards": -(rs.rand(ROWS) < 0.9).astype(np.float32),
            "masks": (rs.rand(ROWS) < 0.95).astype(np.float32),
            "terminals": terminals,
            "next_observations": np.roll(obs, -1, axis=0),
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# (a) matmul rate
# ----------------------------------------------------------------------------------------------------------------


def _chain(fn, reps: int):
    """jit(reps applications of a <- fn(a, w)), rescaled so that values stay finite and normal."""

    def run(a, w):
        return jax.lax.fori_loop(0, reps, lambda _, a: fn(a, w) * 0.03, a)

    return jax.jit(run)


def _best_seconds(fn, tries: int) -> float:
    best = np.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rates(tries: int = 5) -> dict[str, float]:
    cases = {
        "square 2048": (lambda a, w: a @ w, (2048, 2048), (2048, 2048), 4),
        "(2560, 512) x (512, 512)": (lambda a, w: a @ w, (2560, 512), (512, 512), 30),
        "(10, 256, 512) x (10, 512, 512)": (
            lambda a, w: jnp.einsum("ebi,eio->ebo", a, w),
            (10, 256, 512),
            (10, 512, 512),
            30,
        ),
    }
    rates = {}
    for name, (fn, a_shape, w_shape, reps) in cases.items():
        a = jax.random.normal(jax.random.PRNGKey(0), a_shape, jnp.float32)
        w = jax.random.normal(jax.random.PRNGKey(1), w_shape, jnp.float32)
        flops = 2.0 * np.prod(a_shape) * w_shape[-1] * reps
        run = _chain(fn, reps)
        run(a, w).block_until_ready()
        rates[name] = flops / _best_seconds(lambda run=run, a=a, w=w: run(a, w), tries) / 1e9
    return rates


def make_probe(tries: int = 2):
    """A ~0.1 s matmul probe: best rate (GFLOP/s) of `tries` calls of a (2560, 512) x (512, 512) chain."""
    m, k, n = PROBE_SHAPE
    a = jax.random.normal(jax.random.PRNGKey(2), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(3), (k, n), jnp.float32)
    run = _chain(lambda a, w: a @ w, PROBE_REPS)
    run(a, w).block_until_ready()
    return lambda: 2.0 * m * k * n * PROBE_REPS / _best_seconds(lambda: run(a, w), tries) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# (b, c) updates
# ----------------------------------------------------------------------------------------------------------------


def configs(params_path: Path) -> dict[str, tuple[object, object, int]]:
    """name -> (agent module, config, K updates per timed call)."""
    paper = rql.Config(
        obs_dim=OBS_DIM,
        action_dim=ACTION_DIM,
        h=5,
        flow_steps=10,
        batch_size=256,
        actor_hidden=(512,) * 4,
        critic_hidden=(512,) * 4,
        ensemble=10,
    )
    params = load_params(params_path)
    dataset = params.datasets[0]
    default = {name: run_spec(params, name, dataset, OBS_DIM, ACTION_DIM) for name in ("rql", "fql", "bc_flow")}
    online = default["rql"].config
    other = "exact" if online.reversal_method == "euler" else "euler"
    return {
        "paper": (rql, paper, 4),
        "rql": (default["rql"].module, online, 40),
        f"rql_{other}": (rql, dataclasses.replace(online, reversal_method=other), 20),
        "fql": (default["fql"].module, default["fql"].config, 40),
        "bc_flow": (default["bc_flow"].module, default["bc_flow"].config, 100),
    }


def signature_flops(signature) -> float:
    """2 * M * N * K of a dot_general signature (lhs shape, rhs shape, dimension numbers)."""
    lhs_shape, rhs_shape, dims = signature
    (lhs_contract, _), _ = dims
    out_shape = jax.eval_shape(
        lambda a, b: jax.lax.dot_general(a, b, dims),
        jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
        jax.ShapeDtypeStruct(rhs_shape, jnp.float32),
    ).shape
    return 2.0 * float(np.prod(out_shape)) * float(np.prod([lhs_shape[d] for d in lhs_contract]))


def dot_counts(jaxpr, loops: list) -> dict:
    """Dot signature (lhs shape, rhs shape, dimension numbers) -> executions in one run of `jaxpr`.

    Scan bodies count times their length, a cond its costliest branch. A while loop's body counts once (its trip
    count is data-dependent); each one found is appended to `loops`.
    """
    counts: dict = {}

    def add(sub_counts: dict, times: float) -> None:
        for key, count in sub_counts.items():
            counts[key] = counts.get(key, 0.0) + times * count

    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        if prim == "dot_general":
            key = (
                tuple(eqn.invars[0].aval.shape),
                tuple(eqn.invars[1].aval.shape),
                eqn.params["dimension_numbers"],
            )
            add({key: 1.0}, 1.0)
            continue
        if prim == "while":
            loops.append(prim)
        subs = [dot_counts(sub, loops) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
        if prim == "cond" and subs:
            subs = [max(subs, key=lambda c: sum(n * signature_flops(k) for k, n in c.items()))]
        for sub in subs:
            add(sub, float(eqn.params["length"]) if prim == "scan" else 1.0)
    return counts


def dot_ceiling(counts: dict, tries: int = 7, show: bool = False) -> float:
    """Seconds the update's dots take alone, each signature timed apart at its own best rate.

    Every other operation of the update (GELU, LayerNorm, Adam, sampling, the reversal's adds) is left out, so no
    implementation of the same dots in the same shapes can beat this on this machine: it is the ceiling of the
    "of matmul" fraction. A signature is timed as one jitted call of P * P dots, every pair of P distinct lhs and P
    distinct rhs operands (so XLA can neither merge nor hoist any of them), all outputs returned and nothing else
    computed; P grows for small dots so the call's dispatch is amortised.
    """
    seconds = 0.0
    for (lhs_shape, rhs_shape, dims), count in counts.items():
        flops = signature_flops((lhs_shape, rhs_shape, dims))
        out_bytes = 4.0 * flops / 2.0 / np.prod([lhs_shape[d] for d in dims[0][0]])
        operand_bytes = 4.0 * (np.prod(lhs_shape) + np.prod(rhs_shape))
        pairs = 2
        while (
            pairs < 12
            and (pairs + 1) ** 2 * flops < 0.1 * 150e9
            and (pairs + 1) * operand_bytes + (pairs + 1) ** 2 * out_bytes < 1e9
        ):
            pairs += 1
        lhs = [jax.random.normal(jax.random.PRNGKey(10 + i), lhs_shape, jnp.float32) for i in range(pairs)]
        rhs = [jax.random.normal(jax.random.PRNGKey(50 + i), rhs_shape, jnp.float32) for i in range(pairs)]
        run = jax.jit(lambda lhs, rhs, dims=dims: [jax.lax.dot_general(a, b, dims) for a in lhs for b in rhs])
        jax.block_until_ready(run(lhs, rhs))
        best = _best_seconds(lambda run=run, lhs=lhs, rhs=rhs: run(lhs, rhs), tries) / pairs**2
        seconds += count * best
        if show:
            print(
                f"    dot {lhs_shape!s:>16s} x {rhs_shape!s:>16s} contract {dims[0]} batch {dims[1]}: "
                f"x{count:g}, {1e3 * best:.3f} ms each, {flops / best / 1e9:.0f} GFLOP/s, {1e3 * count * best:.2f} ms"
            )
    return seconds


def update_flops(agent, config, data) -> tuple[float, float, bool, dict]:
    """FLOPs of one update: (matmul FLOPs of the jaxpr, XLA cost analysis FLOPs, whether it has while loops,
    dot signature -> executions)."""
    state = agent.init(config, jax.random.PRNGKey(0))
    step = agent.make_step(config)
    cost = jax.jit(step).lower(state, data).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jaxpr = jax.make_jaxpr(step)(state, data).jaxpr
    try:  # drop what is computed but never used, as XLA does (e.g. unused cotangents of custom VJPs)
        from jax._src.interpreters import partial_eval

        jaxpr, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    except (ImportError, AttributeError, TypeError):
        pass
    loops: list = []
    counts = dot_counts(jaxpr, loops)
    flops = sum(count * signature_flops(key) for key, count in counts.items())
    return flops, float(cost.get("flops", np.nan)), bool(loops), counts


def time_update(agent, config, data, k: int, rounds: int, probe) -> dict:
    """Compile, then `rounds` rounds of (probe, one call of K updates). Seconds per update and probe rates."""
    update = agent.make_update(config, k)
    state = agent.init(config, jax.random.PRNGKey(0))
    state, metrics = update(state, data)
    jax.block_until_ready(state)
    seconds, probes, cpu, wall = [], [], 0.0, 0.0
    for _ in range(rounds):
        probes.append(probe())
        c0, t0 = time.process_time(), time.perf_counter()
        state, metrics = update(state, data)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - t0
        wall += elapsed
        cpu += time.process_time() - c0
        seconds.append(elapsed / k)
    return {
        "seconds": np.array(seconds),
        "probes": np.array(probes),
        "cores": cpu / wall,
        "metrics": {name: float(v) for name, v in metrics.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", nargs="*", default=None, help="paper, rql, rql_exact (or rql_euler), fql, bc_flow"
    )
    parser.add_argument("--dots", action="store_true", help="print each dot signature's count, rate and time")
    parser.add_argument("--rounds", type=int, default=5, help="timed (probe, K updates) rounds per update")
    parser.add_argument("--k-scale", type=float, default=1.0, help="scale the K updates per timed call")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="default configuration")
    args = parser.parse_args()

    print(f"start: {uptime()}")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    before = matmul_rates()
    for name, rate in before.items():
        print(f"matmul {name:34s} {rate:7.1f} GFLOP/s")
    probe = make_probe()
    data = synthetic_dataset()

    rows = []
    for name, (agent, config, k) in configs(args.params).items():
        if args.only and name not in args.only:
            continue
        k = max(1, round(k * args.k_scale))
        flops, xla_flops, has_while, signatures = update_flops(agent, config, data)
        result = time_update(agent, config, data, k, args.rounds, probe)
        dots_seconds = dot_ceiling(signatures, show=args.dots)
        seconds, probes = result["seconds"], result["probes"]
        paired = float(np.median(flops / seconds / 1e9 / probes))
        note = ""
        if "reversal_iterations" in result["metrics"]:
            m = result["metrics"]
            note = f"; fixed point: max {m['reversal_iterations']:.1f} updates/step, residual {m['reversal_residual_max']:.1e}"
        if has_while:
            note += "; while-loop bodies counted once (lower bound)"
        rows.append((name, float(seconds.min()), flops, paired, result["cores"], has_while, dots_seconds))
        print(
            f"{name:10s} K={k:3d}  best {1e3 * seconds.min():8.2f} ms/update (median {1e3 * np.median(seconds):.2f}), "
            f"matmul {flops / 1e9:.2f} GFLOP, XLA cost analysis {xla_flops / 1e9:.2f} GFLOP, "
            f"probe {probes.max():.0f} GFLOP/s, its {len(signatures)} dot shapes alone {1e3 * dots_seconds:.2f} ms{note}",
            flush=True,
        )
        before[f"probe during {name}"] = float(probes.max())

    after = matmul_rates()
    for name, rate in after.items():
        print(f"matmul {name:34s} {rate:7.1f} GFLOP/s (after)")
    rate = max(max(before.values()), max(after.values()))
    print(f"\nreference float32 matmul rate: {rate:.1f} GFLOP/s (best of all shapes and probes)")
    print(
        f"{'update':10s} {'ms/update':>10s} {'updates/s':>10s} {'GFLOP':>7s} {'GFLOP/s':>8s} "
        f"{'of matmul':>10s} {'paired':>7s} {'cores':>6s} {'dots ms':>8s} {'ceiling':>8s} {'of ceil':>8s}"
    )
    for name, seconds, flops, paired, cores, has_while, dots_seconds in rows:
        achieved = flops / seconds / 1e9
        mark = ">=" if has_while else "  "
        print(
            f"{name:10s} {1e3 * seconds:10.2f} {1 / seconds:10.1f} {flops / 1e9:7.2f} {mark}{achieved:6.1f} "
            f"{mark}{achieved / rate:8.2f} {mark}{paired:5.2f} {cores:6.2f} {1e3 * dots_seconds:8.2f} "
            f"{mark}{flops / dots_seconds / 1e9 / rate:6.2f} {mark}{dots_seconds / seconds:6.2f}"
        )
    print(
        "ceiling: the update's dots alone, each shape at its own best rate, as a fraction of the reference rate "
        "(no update with the same dots can do better here); of ceil: dots-alone time / update time"
    )
    print(f"end: {uptime()}")


if __name__ == "__main__":
    main()
