"""Micro-batches give the same update, pi_old and gradient cosine as the whole batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minirl_jax import objectives
from minirl_jax.rl import micro
from minirl_jax.rl import losses
from minirl_jax.rl import step as step_lib
from minirl_jax.rl import train_state
import rl_train_step_test
from rl_train_step_test import MODEL

# Registers rl_train_step_test's module-scoped fixture here, for the tests that take `setup`.
setup = rl_train_step_test.setup


def _rel(a, b):
  """Largest difference over a pytree, relative to each leaf's largest magnitude."""
  errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) /
                                         max(float(jnp.max(jnp.abs(y))), 1e-30)), a, b)
  return max(jax.tree.leaves(errs))


def _stale(params):
  """Params an update away from pi_old, so ratios, clipping and IS weights all act."""
  noise = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(3), x.shape), params)
  return jax.tree.map(jnp.add, params, noise)


def test_split_and_join_round_trip_with_strided_rows():
  x = jnp.arange(24).reshape(8, 3)
  parts = micro.split({"x": x, "n": jnp.float32(8)}, 4)
  np.testing.assert_array_equal(parts["x"][1], x[1::4])  # micro-batch j: rows j, j + 4
  np.testing.assert_array_equal(parts["n"], [8.0] * 4)  # global counts repeat
  np.testing.assert_array_equal(micro.join(parts["x"]), x)


def test_split_takes_a_records_rows_on_its_declared_axis(setup):
  _, rollout, _, batch = setup
  parts = micro.split(batch.replace(routing=rollout.routing_mu), 4)  # routing [L, B, T, k]
  np.testing.assert_array_equal(parts.routing[1], rollout.routing_mu[:, 1::4])
  np.testing.assert_array_equal(parts.tokens[3], batch.tokens[3::4])
  assert parts.num_tokens.shape == (4,) and float(parts.num_tokens[2]) == float(batch.num_tokens)


def _norm_rel(a, b):
  diff = jax.tree.map(jnp.subtract, a, b)
  return float(optax.tree.norm(diff) / optax.tree.norm(b))


@pytest.mark.parametrize("objective,replay", [("minirl", "r3")])
def test_update_is_the_same_for_every_micro_batch_size(setup, objective, replay):
  params, rollout, _, batch = setup
  batch = batch.replace(routing=rollout.routing_mu if replay == "r3" else None)
  stale = _stale(params)
  # SGD: the update is -1000 x the gradient, large enough that new - old params keep the
  # gradient's digits (Adam's first step is ~sign(g), which would magnify float32 rounding
  # of near-zero gradient entries).
  sgd = optax.sgd(1000.0)
  step = lambda n: jax.jit(functools.partial(
      step_lib.rl_step, model_cfg=MODEL, optimizer=sgd, micro_batches=n,
      obj_cfg=objectives.ObjectiveConfig(name=objective)))(train_state.init_state(stale, sgd),
                                                           batch)
  (want_state, want_m), (got_state, got_m) = step(1), step(4)
  assert float(want_m["policy/clip_frac"]) > 0 or objective != "minirl"
  update = lambda state: jax.tree.map(jnp.subtract, state.params, stale)
  assert _norm_rel(update(got_state), update(want_state)) < 1e-6
  for key, value in want_m.items():
    if key.startswith("moe/"):  # router statistics of each micro-batch's own forward
      continue
    assert float(got_m[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_pi_old_cosine_and_sft_are_the_same_in_micro_batches(setup):
  params, rollout, _, batch = setup
  old = lambda n, replay: jax.jit(functools.partial(
      step_lib.pi_old_forward, replay=replay, model_cfg=MODEL, micro_batches=n))(
          params, rollout)
  for replay in (step_lib.RoutingReplay.R3,):  # replayed routing: rows on its second axis
    want = old(1, replay)
    got = old(4, replay)
    np.testing.assert_allclose(got.logp, want.logp, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.routing, want.routing)
    np.testing.assert_array_equal(got.live_routing, want.live_routing)

  stale = _stale(params)
  cosine = lambda n: float(jax.jit(functools.partial(
      losses.grad_cosine_token_seq, model_cfg=MODEL, micro_batches=n,
      obj_cfg=objectives.ObjectiveConfig()))(stale, batch))
  assert cosine(2) == pytest.approx(cosine(1), abs=1e-6)

  sft_batch = {"tokens": rollout.tokens, "attn_mask": rollout.attn_mask,
               "loss_mask": rollout.completion_mask}
  sgd = optax.sgd(0.1)  # the update is the gradient (see the test above)
  state = train_state.init_state(params, sgd)
  sft = lambda n: jax.jit(functools.partial(step_lib.sft_step, model_cfg=MODEL,
                                            optimizer=sgd, micro_batches=n))(state, sft_batch)
  (want_state, want_m), (got_state, got_m) = sft(1), sft(4)
  assert _rel(got_state.params, want_state.params) < 1e-6
  assert float(got_m["sft/loss"]) == pytest.approx(float(want_m["sft/loss"]), rel=1e-6)
