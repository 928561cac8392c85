"""Failures that stop clearly and lose nothing: the non-finite guard, damaged checkpoints and
metrics, preemption signals, and config values that cannot work."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax.rl import settings
from minirl_jax.rl import train_state
from rl_loop_test import smoke_config
from rl_loop_test import smoke_run


def _state(params, optimizer):
  return train_state.init_state(params, optimizer)


@pytest.mark.parametrize("loss,grad,lr,first", [
    (jnp.nan, 1.0, 0.1, "loss"),
    (1.0, jnp.inf, 0.1, "gradients"),
    (1.0, 1e30, 1e10, "update"),  # every input finite; the update overflows float32
])
def test_guard_leaves_the_state_unchanged_and_names_what_was_not_finite(loss, grad, lr, first):
  optimizer = optax.sgd(lr, momentum=0.9)
  state = _state({"w": jnp.ones((2, 3))}, optimizer)
  grads = {"w": jnp.full((2, 3), grad, jnp.float32)}
  new, m = jax.jit(train_state.apply_update, static_argnums=3)(state, jnp.float32(loss), grads,
                                                               optimizer)
  assert float(m["optim/skipped"]) == 1.0
  assert [q for q in train_state.GUARDED if m[f"optim/nonfinite_{q}"] > 0][0] == first
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)  # params, momentum and step as they were


def test_guard_applies_a_finite_update():
  optimizer = optax.sgd(0.5)
  state = _state({"w": jnp.ones((2,))}, optimizer)
  new, m = train_state.apply_update(state, jnp.float32(1.0), {"w": jnp.array([1.0, -2.0])},
                                    optimizer)
  np.testing.assert_array_equal(new.params["w"], [0.5, 2.0])
  assert int(new.step) == 1 and float(m["optim/skipped"]) == 0.0
  assert all(float(m[f"optim/nonfinite_{q}"]) == 0.0 for q in train_state.GUARDED)


@pytest.mark.parametrize("overrides,message", [
    ({"optim.eps": 1e-50}, r"optim.eps is 1e-50, which is 0.0 in the parameter dtype float32"),
    ({"rl.learning_rate": 1e39}, r"rl.learning_rate is 1e\+39, which is inf"),
    ({"rl.learning_rate": -1.0}, r"rl.learning_rate must be > 0"),
    ({"optim.max_skipped_in_a_row": 0}, r"optim.max_skipped_in_a_row must be >= 1"),
])
def test_configs_that_cannot_train_are_rejected_naming_the_field(overrides, message):
  with pytest.raises(errors.UserError, match=message):
    settings.from_config(smoke_config(**overrides))


@pytest.mark.parametrize("overrides,field", [
    ({"sampler.temperature": 0.0}, "sampler.temperature"),
    ({"sampler.top_k": 1}, "sampler.top_k"),
])
def test_samplers_whose_group_cannot_differ_need_allow_greedy(overrides, field):
  with pytest.raises(errors.UserError, match=rf"{field} .*rl.allow_greedy=True"):
    settings.check_trainable(settings.from_config(smoke_config(**overrides)))
  allowed = settings.from_config(smoke_config(**overrides, **{"rl.allow_greedy": True}))
  settings.check_trainable(allowed)  # intended: no error


def test_a_diverging_run_stops_and_never_saves_non_finite_weights(tmp_path):
  diverging = {"sft.learning_rate": 1e30, "sft.max_steps": 8, "optim.max_skipped_in_a_row": 2,
               "sft.eval_every": 100}
  run = smoke_run(tmp_path, **diverging)
  with pytest.raises(errors.RunStopped, match=r"sft step \d: 2 updates in a row were "
                     r"skipped because the \w+ was not finite"):
    run.run()
  assert run.progress.sft_step < 8
  restored = smoke_run(tmp_path, **diverging)
  assert restored.restore()
  leaves = jax.tree.leaves(restored.state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype,
                                                                              jnp.floating))


def test_resume_skips_a_damaged_checkpoint_and_a_cut_off_metrics_line(tmp_path, caplog):
  overrides = {"rl.steps": 0, "sft.eval_every": 100}
  smoke_run(tmp_path, **overrides).run()  # SFT 4 steps: checkpoints 2 and 4
  ckpts = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["2", "4"]
  state_files = [p for p in (ckpts / "4" / "state").rglob("*") if p.is_file()]
  biggest = max(state_files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 3])  # truncated
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "stage": "sft", "sft/lo')  # a write cut off by a kill

  run = smoke_run(tmp_path, **overrides)
  assert run.restore() and run.progress.sft_step == 2
  assert os.listdir(ckpts) == ["2"]
  moved = os.listdir(tmp_path / "checkpoints_damaged")
  assert len(moved) == 1 and moved[0].startswith("4_")  # kept for inspection, not deleted
  assert any("checkpoint 4 failed to restore" in r.getMessage() for r in caplog.records)
  records = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"), drop_cut_last_line=True)
  assert [r["step"] for r in records if r["stage"] == "sft"] == [1, 2, 3, 4]
  assert any("cut off mid-write" in r.getMessage() for r in caplog.records)
  run.close()  # releases the workdir

  # Another model: refused before any checkpoint is read, naming the field.
  with pytest.raises(errors.UserError, match=r"model\.d_model: 32 -> 48\. Resume"):
    smoke_run(tmp_path, **overrides, **{"model.d_model": 48})
  # Without the run's recorded settings the checkpoints still refuse it: every one fails
  # alike, one error, nothing moved.
  os.remove(tmp_path / "settings.json")
  wrong = smoke_run(tmp_path, **overrides, **{"model.d_model": 48})
  with pytest.raises(errors.UserError, match=r"no checkpoint under .* restores; the newest "
                     r"\(step 2\)"):
    wrong.restore()
  assert os.listdir(ckpts) == ["2"] and len(os.listdir(tmp_path / "checkpoints_damaged")) == 1


def test_a_bad_metrics_line_in_the_middle_names_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
  with pytest.raises(errors.UserError, match=rf"{path}: line 2: invalid JSON"):
    metrics.read_jsonl(str(path), drop_cut_last_line=True)
