"""The outer training loop: schedule checks, logging windows, checkpoints, non-finite stops, exact resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stages.core import batches, checkpoints, training_loop
from stages.core.agents import bc_flow
from stages.core.training_loop import NonFiniteLossError, Schedule


def counting_update(state, data):
    """A fake K=2 update: the state counts steps, the metric is the step count (or NaN once it passes 'poison')."""
    step = state["step"] + 2
    loss = jnp.where(step > data["poison"], jnp.nan, step.astype(jnp.float32))
    return {"step": step}, {"loss": loss}


def test_schedule_rejects_periods_off_the_call_grid():
    with pytest.raises(ValueError, match="log_every=150 must be a non-negative multiple of updates_per_call=100"):
        Schedule(total_steps=1000, updates_per_call=100, log_every=150, checkpoint_every=500)
    with pytest.raises(ValueError, match="checkpoint_every=300 must be a multiple of refresh_every=200"):
        Schedule(total_steps=1200, updates_per_call=100, log_every=100, checkpoint_every=300, refresh_every=200)


def test_metrics_are_averaged_per_log_window_and_callbacks_fire_on_boundaries():
    logged, evals, saved = [], [], []

    class Recorder:
        def save(self, step, state, *, force=False):
            saved.append((step, force))
            return True

    schedule = Schedule(total_steps=12, updates_per_call=2, log_every=4, checkpoint_every=6, eval_every=8)
    state = training_loop.run(
        {"step": jnp.int32(0)}, {"poison": jnp.int32(10**6)}, counting_update, schedule, checkpointer=Recorder(),
        on_metrics=lambda step, m, *_: logged.append((step, m["loss"])), on_eval=lambda step, s: evals.append(step),
        progress=False,
    )
    assert int(state["step"]) == 12
    # windows end at log and checkpoint boundaries: (2+4)/2, (6)/1, (8)/1, (10+12)/2 ...
    assert [s for s, _ in logged] == [4, 6, 8, 12]
    assert dict(logged) == {4: 3.0, 6: 6.0, 8: 8.0, 12: 11.0}
    assert saved == [(6, False), (12, True)]
    assert evals == [8, 12]


def test_eval_at_end_can_be_left_to_the_evaluate_stage():
    evals = []
    schedule = Schedule(total_steps=8, updates_per_call=2, log_every=4, checkpoint_every=8, eval_every=4)
    training_loop.run({"step": jnp.int32(0)}, {"poison": jnp.int32(100)}, counting_update, schedule,
                      on_eval=lambda step, s: evals.append(step), eval_at_end=False, progress=False)
    assert evals == [4]


def test_a_non_finite_loss_stops_before_the_checkpoint_and_names_the_steps():
    saved = []

    class Recorder:
        def save(self, step, state, *, force=False):
            saved.append(step)
            return True

    schedule = Schedule(total_steps=20, updates_per_call=2, log_every=4, checkpoint_every=4)
    with pytest.raises(NonFiniteLossError,
                       match=r"loss became non-finite \(nan\) between update steps 9 and 12") as info:
        training_loop.run({"step": jnp.int32(0)}, {"poison": jnp.int32(10)}, counting_update, schedule,
                          checkpointer=Recorder(), progress=False)
    assert saved == [4, 8]  # the step-12 state, which produced NaN, is never saved
    assert (info.value.metric, info.value.first_step, info.value.last_step) == ("loss", 9, 12)


def test_a_checkpoint_holds_the_history_of_every_row_up_to_its_step_evaluations_included():
    """Evaluations at a checkpoint step run before the save, so their rows are in the extras saved with it."""
    saved, order = {}, []
    history = training_loop.MetricHistory()

    class Recorder:
        def save(self, step, state, *, force=False, extras=None):
            order.append(("save", step))
            saved[step] = json.loads(json.dumps(extras))
            return True

    def on_eval(step, state):
        order.append(("eval", step))
        history.record(step, {"eval/success": float(step)})

    schedule = Schedule(total_steps=12, updates_per_call=2, log_every=2, checkpoint_every=4, eval_every=4)
    training_loop.run({"step": jnp.int32(0)}, {"poison": jnp.int32(100)}, counting_update, schedule,
                      checkpointer=Recorder(), on_metrics=lambda step, m, *_: history.record(step, {"loss": m["loss"]}),
                      on_eval=on_eval, eval_at_end=False, checkpoint_extras=lambda: {"history": history.rows},
                      progress=False)
    assert order == [("eval", 4), ("save", 4), ("eval", 8), ("save", 8), ("save", 12)]
    assert saved[8]["history"] == [[2, {"loss": 2.0}], [4, {"loss": 4.0}], [4, {"eval/success": 4.0}],
                                   [6, {"loss": 6.0}], [8, {"loss": 8.0}], [8, {"eval/success": 8.0}]]
    assert saved[12]["history"][-1] == [12, {"loss": 12.0}]
    restored = training_loop.MetricHistory(saved[12]["history"])
    assert restored.rows == history.rows and restored.upto(4).rows == history.rows[:3]
    with pytest.raises(ValueError, match="metric history row"):
        training_loop.MetricHistory([["4", {"loss": 1.0}]])


def tiny_dataset(rng: np.random.Generator, episodes: int = 3, length: int = 40) -> dict[str, np.ndarray]:
    n = episodes * length
    terminals = np.zeros(n, np.float32)
    terminals[length - 1 :: length] = 1.0
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    return {"observations": obs, "actions": np.tanh(rng.normal(size=(n, 2))).astype(np.float32),
            "rewards": -np.ones(n, np.float32), "masks": np.ones(n, np.float32), "terminals": terminals,
            "next_observations": np.roll(obs, -1, axis=0)}


def test_resume_from_a_checkpoint_ends_exactly_where_an_uninterrupted_run_does(tmp_path):
    config = bc_flow.Config(obs_dim=4, action_dim=2, h=2, flow_steps=3, actor_hidden=(16,), batch_size=8)
    data = batches.to_device(tiny_dataset(np.random.default_rng(0)))
    update = bc_flow.make_update(config, 2)
    schedule = Schedule(total_steps=12, updates_per_call=2, log_every=2, checkpoint_every=6)

    straight = training_loop.run(bc_flow.init(config, jax.random.PRNGKey(3)), data, update, schedule, progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_first_checkpoint(step, metrics, state, data_now):
        if step == 8:
            raise Interrupt

    with checkpoints.TrainCheckpointer(tmp_path / "ckpt", save_every=6) as manager, pytest.raises(Interrupt):
        training_loop.run(bc_flow.init(config, jax.random.PRNGKey(3)), data, update, schedule,
                          checkpointer=manager, on_metrics=stop_after_first_checkpoint, progress=False)
    with checkpoints.TrainCheckpointer(tmp_path / "ckpt", save_every=6) as manager:
        state, step, *_ = manager.resume(bc_flow.init(config, jax.random.PRNGKey(99)))
        assert step == 6
        resumed = training_loop.run(state, data, update, schedule, start_step=step, checkpointer=manager,
                                    progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refresh_runs_on_its_boundaries_and_again_when_resuming_there():
    refreshed = []

    def refresh(state, data):
        refreshed.append(int(state["step"]))
        return data

    schedule = Schedule(total_steps=12, updates_per_call=2, log_every=2, checkpoint_every=8, refresh_every=4)
    training_loop.run({"step": jnp.int32(0)}, {"poison": jnp.int32(100)}, counting_update, schedule,
                      refresh=refresh, progress=False)
    assert refreshed == [4, 8]  # not after the last step
    refreshed.clear()
    training_loop.run({"step": jnp.int32(8)}, {"poison": jnp.int32(100)}, counting_update, schedule,
                      start_step=8, refresh=refresh, progress=False)
    assert refreshed == [8]  # the resumed run rebuilds the cache the interrupted one had built at step 8


def test_multi_file_data_is_swapped_on_its_boundaries():
    swapped = []

    def swap(step, data):
        swapped.append(step)
        return {"poison": data["poison"] + 0}

    schedule = Schedule(total_steps=12, updates_per_call=2, log_every=2, checkpoint_every=12, swap_every=4)
    training_loop.run({"step": jnp.int32(0)}, {"poison": jnp.int32(100)}, counting_update, schedule, swap=swap,
                      progress=False)
    assert swapped == [4, 8]
