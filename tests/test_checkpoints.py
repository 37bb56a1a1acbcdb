"""Training-state checkpoints (Orbax): resume, retention, mismatches, damaged steps."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from stages.core import checkpoints as C

ROOT = Path(__file__).parents[1]


# ---------------------------------------------------------------------------------------------------------------
# A toy training loop whose state has everything a real one has


class MLP(nn.Module):
    hidden: int = 8

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.gelu(nn.Dense(self.hidden)(x)))


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any  # optax: tuple of namedtuples
    target_params: Any
    ema_params: Any
    key: jax.Array  # typed key
    raw_key: jax.Array  # legacy uint32 key
    step: jax.Array


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


@functools.partial(jax.jit, static_argnames="hidden")
def _init_state(seed: jax.Array, hidden: int) -> TrainState:
    params = MLP(hidden).init(jax.random.key(seed), jnp.zeros((1, 3)))
    return TrainState(
        params=params,
        opt_state=TX.init(params),
        target_params=params,
        ema_params=params,
        key=jax.random.key(seed + 100),
        raw_key=jax.random.PRNGKey(seed + 200),
        step=jnp.asarray(0, jnp.int32),
    )


@functools.cache  # states are immutable; one compiled initialiser per width
def init_state(seed: int, hidden: int = 8) -> TrainState:
    return _init_state(jnp.asarray(seed, jnp.int32), hidden)


@jax.jit
def update(state: TrainState) -> TrainState:
    key, k_x = jax.random.split(state.key)
    raw_key, k_noise = jax.random.split(state.raw_key)
    x = jax.random.normal(k_x, (16, 3))
    y = x.sum(-1, keepdims=True) + 0.1 * jax.random.normal(k_noise, (16, 1))

    def loss_fn(params):
        return jnp.mean((MLP().apply(params, x) - y) ** 2)

    grads = jax.grad(loss_fn)(state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(
        params=params,
        opt_state=opt_state,
        target_params=optax.incremental_update(params, state.target_params, 0.1),
        ema_params=optax.incremental_update(params, state.ema_params, 0.01),
        key=key,
        raw_key=raw_key,
        step=state.step + 1,
    )


def assert_states_equal(a: TrainState, b: TrainState) -> None:
    def plain(tree):
        return jax.tree.map(
            lambda v: np.asarray(
                jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v
            ),
            tree,
        )

    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(plain(a)), jax.tree_util.tree_leaves(plain(b)), strict=True
    ):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------------------
# Training state


def test_resume_gives_exactly_the_same_state(tmp_path, monkeypatch):
    n = 8
    straight = init_state(0)
    for _ in range(n):
        straight = update(straight)

    monkeypatch.chdir(tmp_path)  # a relative directory must work (Orbax needs absolute paths)
    first = init_state(0)
    with C.TrainCheckpointer("run/checkpoints", save_every=n // 2) as ckpt:
        assert ckpt.directory == tmp_path / "run" / "checkpoints"
        for step in range(1, n // 2 + 1):
            first = update(first)
            ckpt.save(step, first)
        assert ckpt.all_steps() == [n // 2]
    del first, ckpt

    with C.TrainCheckpointer("run/checkpoints", save_every=n // 2) as ckpt:
        # A different seed: every value must come from the checkpoint.
        state, step, *_ = ckpt.resume(init_state(1))
        assert step == n // 2 and int(state.step) == n // 2
        assert jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key)
        assert isinstance(state.opt_state[1][0], optax.ScaleByAdamState)
        assert ckpt.save(step, state) is False  # the resumed step already exists: skipped, no crash
        for step in range(n // 2 + 1, n + 1):
            state = update(state)
            ckpt.save(step, state)
        assert ckpt.latest_step() == n
    assert_states_equal(straight, state)
    assert not np.array_equal(
        np.asarray(straight.params["params"]["Dense_0"]["kernel"]),
        np.asarray(init_state(0).params["params"]["Dense_0"]["kernel"]),
    )


def test_resume_without_checkpoint_returns_init(tmp_path):
    init = init_state(0)
    with C.TrainCheckpointer(tmp_path / "ck", save_every=5) as ckpt:
        state, step, extras, skipped = ckpt.resume(init)
        assert step is None and state is init and extras is None and skipped == ()
        with pytest.raises(C.CheckpointError, match=f"no checkpoint in {tmp_path / 'ck'}"):
            ckpt.restore(init)


def test_save_schedule_and_retention(tmp_path):
    state = init_state(0)
    with C.TrainCheckpointer(tmp_path / "ck", save_every=5, max_to_keep=2) as ckpt:
        # Steps advance by 3 updates per call: saves happen when a multiple of 5 is crossed.
        written = [step for step in range(3, 15, 3) if ckpt.save(step, state)]
        assert written == [6, 12]
        assert ckpt.save(14, state, force=True)
        assert ckpt.all_steps() == [12, 14]
        assert ckpt.save(14, state, force=True) is False
    with C.TrainCheckpointer(tmp_path / "ck", save_every=5, max_to_keep=2) as ckpt:
        assert ckpt.save(14, state, force=True) is False  # existing step after reopening: skipped
        assert ckpt.latest_step() == 14
        with pytest.raises(C.CheckpointError, match=r"no checkpoint for step 3 .* \(have \[12, 14\]\)"):
            ckpt.restore(state, step=3)


def test_template_mismatch_names_directory_and_leaves(tmp_path):
    directory = tmp_path / "ck"
    with C.TrainCheckpointer(directory, save_every=1) as ckpt:
        ckpt.save(1, init_state(0))
        with pytest.raises(C.CheckpointMismatchError) as info:
            ckpt.restore(init_state(0, hidden=16))
        message = str(info.value)
        assert f"checkpoint step 1 in {directory} does not match the template state" in message
        assert "ema_params.params.Dense_1.kernel: file float32[3, 8] != template float32[3, 16]" in message
        assert message.endswith("... and 7 more")

        as_f16 = init_state(0).replace(step=jnp.asarray(0, jnp.float16))
        with pytest.raises(C.CheckpointMismatchError, match=r"step: file int32\[\] != template float16\[\]"):
            ckpt.restore(as_f16)

        extra = init_state(0).replace(ema_params={"extra": jnp.zeros(2)})
        with pytest.raises(
            C.CheckpointMismatchError, match=r"ema_params\.extra: in the template, not in the file"
        ):
            ckpt.restore(extra)

        # ShapeDtypeStructs are a valid template, typed keys included.
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), init_state(0))
        assert_states_equal(ckpt.restore(abstract), init_state(0))


def test_metadata_mismatch_refused(tmp_path):
    with C.TrainCheckpointer(tmp_path / "ck", save_every=1, metadata={"alpha": 1.0, "agent": "rql"}) as ckpt:
        ckpt.save(1, init_state(0))
    with (
        C.TrainCheckpointer(tmp_path / "ck", save_every=1, metadata={"alpha": 3.0, "agent": "rql"}) as ckpt,
        pytest.raises(
            C.CheckpointMismatchError, match=r"other metadata \(alpha: checkpoint 1\.0 != run 3\.0\)"
        ),
    ):
        ckpt.resume(init_state(0))
    with C.TrainCheckpointer(tmp_path / "ck", save_every=1, metadata={"agent": "rql", "alpha": 1}) as ckpt:
        step = ckpt.resume(init_state(0)).step  # same values, any key order, int == float in JSON
        assert step == 1


def test_interrupted_save_is_never_latest(tmp_path):
    """A process killed while Orbax commits step 4 (just before the rename): step 2 stays the latest."""
    directory = tmp_path / "ck"
    script = textwrap.dedent(
        f"""
        import os
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from stages.core.checkpoints import TrainCheckpointer

        state = {{"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(2, jnp.int32)}}
        ckpt = TrainCheckpointer({str(directory)!r}, save_every=2)
        ckpt.save(2, state)

        async def die(self, *args, **kwargs):
            os._exit(9)

        atomicity.AtomicRenameTemporaryPath.finalize = die
        ckpt.save(4, {{"w": state["w"] + 1, "step": jnp.asarray(4, jnp.int32)}})
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith("4")]
    assert leftovers and all(".orbax-checkpoint-tmp" in name for name in leftovers), leftovers

    template = {"w": jnp.zeros((2, 3)), "step": jnp.asarray(0, jnp.int32)}
    with C.TrainCheckpointer(directory, save_every=2) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        state, step, *_ = ckpt.resume(template)
        assert step == 2 and int(state["step"]) == 2
        np.testing.assert_array_equal(state["w"], np.arange(6.0).reshape(2, 3))
        assert not any(p.name.startswith("4") for p in directory.iterdir())  # leftover cleaned up
        assert ckpt.save(4, {"w": state["w"] + 1, "step": jnp.asarray(4, jnp.int32)})
        assert ckpt.latest_step() == 4


def saved_steps(directory: Path, steps=(1, 2, 3)) -> dict[int, TrainState]:
    """Checkpoints of ``steps`` in ``directory``, each with its step's metric history as extras."""
    states, state = {}, init_state(0)
    with C.TrainCheckpointer(directory, save_every=1, max_to_keep=None, metadata={"run": "x"}) as ckpt:
        for step in steps:
            state = update(state)
            states[step] = state
            assert ckpt.save(step, state, extras={"history": [[s, {"train/loss": 1.0 / s}] for s in range(1, step + 1)]})
    return states


def test_extras_round_trip_with_the_state(tmp_path):
    states = saved_steps(tmp_path / "ck")
    with C.TrainCheckpointer(tmp_path / "ck", save_every=1, metadata={"run": "x"}) as ckpt:
        state, step, extras, skipped = ckpt.resume(init_state(5))
        assert (step, skipped) == (3, ())
        assert extras == {"history": [[1, {"train/loss": 1.0}], [2, {"train/loss": 0.5}], [3, {"train/loss": 1 / 3}]]}
        assert_states_equal(state, states[3])
        _, older = ckpt.restore_with_extras(init_state(5), step=1)
        assert older == {"history": [[1, {"train/loss": 1.0}]]}
    assert json.loads((tmp_path / "ck" / "3" / C.FILES_MANIFEST).read_text())["files"]


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :])
    else:
        path.unlink()


def _largest_state_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_a_damaged_newest_step_is_moved_aside_and_the_newest_intact_one_resumed(tmp_path, caplog, how):
    directory = tmp_path / "ck"
    states = saved_steps(directory)
    damaged = _largest_state_file(directory / "3")
    _damage(damaged, how)
    with C.TrainCheckpointer(directory, save_every=1, metadata={"run": "x"}) as ckpt:
        state, step, extras, skipped = ckpt.resume(init_state(5))
        assert (step, skipped) == (2, (3,))
        assert len(extras["history"]) == 2
        assert_states_equal(state, states[2])
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        assert ckpt.save(3, update(state))  # the step is written again, not skipped as existing
    assert (directory / C.UNREADABLE_DIR / "3").is_dir()
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "step 3" in r.getMessage())
    assert "unreadable and skipped, moved to" in warning and "resuming from step 2" in warning
    assert damaged.relative_to(directory / "3").as_posix() in warning and "\n" not in warning
    with C.TrainCheckpointer(directory, save_every=1, metadata={"run": "x"}) as ckpt:
        again = ckpt.resume(init_state(5))
        assert (again.step, again.skipped) == (3, ())
        assert_states_equal(again.state, states[3])


def test_damage_orbax_itself_cannot_see_is_caught_by_the_state_digest(tmp_path, caplog):
    """Without the files manifest (an asynchronous save), a flipped byte in a data file still fails the digest."""
    directory = tmp_path / "ck"
    states = saved_steps(directory, steps=(1, 2))
    (directory / "2" / C.FILES_MANIFEST).unlink()
    chunks = [p for p in (directory / "2" / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    for chunk in chunks:  # every chunk file: at least one holds array bytes TensorStore reads unchecked
        _damage(chunk, "flip")
    with C.TrainCheckpointer(directory, save_every=1, metadata={"run": "x"}) as ckpt:
        result = ckpt.resume(init_state(5))
    assert (result.step, result.skipped) == (1, (2,))
    assert_states_equal(result.state, states[1])
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "step 2" in warning and "\n" not in warning and "'driver'" not in warning


def test_no_intact_step_stops_with_one_line_naming_what_to_delete(tmp_path, capfd):
    directory = tmp_path / "ck"
    saved_steps(directory, steps=(1, 2))
    for step in (1, 2):
        _damage(_largest_state_file(directory / str(step)), "truncate")
    with (
        C.TrainCheckpointer(directory, save_every=1, metadata={"run": "x"}) as ckpt,
        pytest.raises(C.CheckpointError) as info,
    ):
        ckpt.resume(init_state(5))
    message = str(info.value)
    assert "\n" not in message and len(message) < 1500
    assert f"no intact checkpoint in {directory}" in message and f"delete {directory} to start" in message
    assert "step 2 in" in message and "step 1 in" in message and "truncated" in message
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # nothing moved: the user decides


def test_orbax_errors_are_cut_to_one_line(tmp_path):
    """Orbax's own errors (here: an item file TensorStore cannot parse) come back as one short line."""
    directory = tmp_path / "ck"
    saved_steps(directory, steps=(1,))
    (directory / "1" / C.FILES_MANIFEST).unlink()
    _damage(directory / "1" / "state" / "_METADATA", "truncate")
    with (
        C.TrainCheckpointer(directory, save_every=1, metadata={"run": "x"}) as ckpt,
        pytest.raises(C.CheckpointError) as info,
    ):
        ckpt.restore(init_state(5), step=1)
    assert "\n" not in str(info.value) and f"step 1 in {directory}" in str(info.value)
