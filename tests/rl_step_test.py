"""The RL step's calls: pi_old -> TrainBatch, mini-batches, updates and the step's metrics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax import objectives
from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import settings
from minirl_jax.rl import step
from minirl_jax.rl import losses
from minirl_jax.rl import train_state
from minirl_jax.sampling import config as sampler_config
from minirl_jax.sampling import quantize
from minirl_jax.sampling import sampler

MODEL = ModelConfig(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, expert_ffn_dim=32)
AXES = transformer.param_axes(MODEL)
G = 4


@pytest.fixture(scope="module")
def setup():
  """A float32 rollout at temperature 0.5 with top-k (processed sampling): 2 prompts x 4."""
  params = transformer.init_params(MODEL, jax.random.key(0))
  scfg = sampler_config.SamplerConfig(dtype="float32", max_new_tokens=6, prompt_bucket=4,
                                      temperature=0.5, top_k=8)
  prompts = jnp.array([[0, 5, 6, 7]] * G + [[8, 9, 10, 11]] * G)
  lengths = jnp.array([3] * G + [4] * G)
  rollout = sampler.generate(quantize.quantize(params, "float32", AXES), prompts, lengths,
                             jax.random.key(1), model_cfg=MODEL, sampler_cfg=scfg)
  advantages = jnp.array([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.0, 0.0])
  return params, rollout, advantages


@functools.cache
def _jitted_pi_old(replay, obj):
  return jax.jit(functools.partial(step.pi_old, model_cfg=MODEL, obj_cfg=obj,
                                   routing_replay=replay, group_size=G))


def _pi_old(params, rollout, advantages, replay="none", **objective):
  obj = objectives.ObjectiveConfig(**objective)
  return _jitted_pi_old(replay, obj)(params, rollout, advantages)


def test_behaviour_logp_picks_the_processed_or_raw_sampler_logp(setup):
  params, rollout, advantages = setup
  mask = rollout.completion_mask > 0
  # Temperature 0.5 sharpens the distribution the tokens came from: the two differ.
  assert np.max(np.abs(np.asarray(rollout.sample_logp - rollout.mu_logp))[mask]) > 0.1
  processed, _ = _pi_old(params, rollout, advantages)
  raw, _ = _pi_old(params, rollout, advantages, behaviour_logp="raw")
  np.testing.assert_array_equal(processed.mu_logp, rollout.sample_logp)
  np.testing.assert_array_equal(raw.mu_logp, rollout.mu_logp)
  np.testing.assert_array_equal(processed.old_logp, raw.old_logp)
  # The zero-gap control: mu_old := pi_old, so every train-infer factor is exactly 1.
  zero, metrics = _pi_old(params, rollout, advantages, behaviour_logp="pi_old")
  np.testing.assert_array_equal(zero.mu_logp, zero.old_logp)
  assert float(metrics["mismatch/kl_mu_pi_old"]) == 0.0
  assert float(metrics["mismatch/kl_k3"]) == 0.0


def test_pi_old_batch_counts_group_lengths_and_full_batch_metrics(setup):
  params, rollout, advantages = setup
  batch, metrics = _pi_old(params, rollout, advantages, replay="r3")
  lengths = np.asarray(rollout.completion_mask).sum(axis=1)
  want_groups = np.repeat(lengths.reshape(2, G).mean(axis=1), G)
  np.testing.assert_allclose(batch.group_length_mean, want_groups)
  assert float(batch.num_sequences) == 8 and float(batch.num_tokens) == lengths.sum()
  np.testing.assert_array_equal(batch.routing, rollout.routing_mu)
  assert float(metrics["rollout/tokens"]) == lengths.sum()
  np.testing.assert_allclose(metrics["rollout/length_mean"], lengths.mean())
  # The global-batch KL is token-weighted over every loss token of the batch.
  old, mu = np.asarray(batch.old_logp), np.asarray(batch.mu_logp)
  mask = np.asarray(rollout.completion_mask)
  np.testing.assert_allclose(metrics["mismatch/kl_mu_pi_old"],
                             np.sum((mu - old) * mask) / mask.sum(), rtol=1e-5)


def test_routing_disagreement_counts_differing_expert_sets():
  # [L=2, B=1, T=3, k=2]; order within a set does not matter; -1 (route live) is skipped.
  a = jnp.array([[[[0, 1], [2, 3], [0, 2]]], [[[1, 0], [-1, -1], [3, 1]]]], jnp.int8)
  b = jnp.array([[[[1, 0], [2, 1], [0, 2]]], [[[0, 1], [2, 3], [3, 2]]]], jnp.int8)
  valid = jnp.array([[True, True, True]])
  # Counted: 5 (layer 1, token 1 is -1 in a). Different sets: (0, 1) and (1, 2): 2 of 5.
  assert float(step.routing_disagreement(a, b, valid)) == pytest.approx(2 / 5)
  # Padding is not counted: tokens 0 and 2 on both layers, only (1, 2) differs: 1 of 4.
  valid = jnp.array([[True, False, True]])
  assert float(step.routing_disagreement(a, b, valid)) == pytest.approx(1 / 4)


def test_minibatch_rows_and_global_counts(setup):
  params, rollout, advantages = setup
  full, _ = _pi_old(params, rollout, advantages, replay="r3")
  rows = np.array([6, 1, 3])
  mb = step.minibatch(full, rows)
  np.testing.assert_array_equal(mb.tokens, np.asarray(full.tokens)[rows])
  np.testing.assert_array_equal(mb.routing, np.asarray(full.routing)[:, rows])
  np.testing.assert_array_equal(mb.group_length_mean, np.asarray(full.group_length_mean)[rows])
  assert float(mb.num_sequences) == 3
  assert float(mb.num_tokens) == np.asarray(full.loss_mask)[rows].sum()
  # Mini-batch losses weighted by their share of sequences add up to the full batch's
  # (MiniRL's sequence normaliser): the split never changes the objective.
  obj = objectives.ObjectiveConfig()
  logp = full.old_logp
  total = objectives.OBJECTIVES["minirl"](logp, full, obj)[0]
  parts = [step.minibatch(full, r) for r in step.minibatch_rows(0, 3, 8, 4)]
  split = sum(objectives.OBJECTIVES["minirl"](logp[np.asarray(r)], p, obj)[0] * 4 / 8
              for r, p in zip(step.minibatch_rows(0, 3, 8, 4), parts))
  np.testing.assert_allclose(split, total, rtol=1e-6)


def test_minibatch_rows_are_a_seeded_permutation():
  rows = step.minibatch_rows(seed=3, step=7, global_batch=8, mini_batch_size=2)
  assert rows.shape == (4, 2) and sorted(rows.ravel()) == list(range(8))
  np.testing.assert_array_equal(rows, step.minibatch_rows(3, 7, 8, 2))
  assert not np.array_equal(rows, step.minibatch_rows(3, 8, 8, 2))


def test_reduce_minibatch_metrics_weights_token_means_and_drops_partial_mismatch():
  per_update = [({"policy/clip_frac": 0.5, "policy/ratio_max": 1.5, "policy/loss": 2.0,
                  "is/first_order_error": 0.1, "mismatch/kl_mu_pi_old": 9.0}, 30.0),
                ({"policy/clip_frac": 0.1, "policy/ratio_max": 1.2, "policy/loss": 4.0,
                  "is/first_order_error": 0.3, "mismatch/kl_mu_pi_old": 7.0}, 10.0)]
  got = step.reduce_minibatch_metrics(per_update)
  assert got == pytest.approx({
      "policy/clip_frac": (0.5 * 30 + 0.1 * 10) / 40,  # token-weighted
      "policy/ratio_max": 1.5,                          # max
      "policy/loss": 3.0, "is/first_order_error": 0.2})  # plain means; mismatch dropped


def test_update_measures_grad_cosine_on_first_and_last_minibatch(setup):
  params, rollout, advantages = setup
  full, _ = _pi_old(params, rollout, advantages)
  obj = objectives.ObjectiveConfig()
  optimizer = train_state.make_optimizer(settings.OptimConfig(learning_rate=0.05), AXES)
  train_fn = jax.jit(functools.partial(step.rl_step, model_cfg=MODEL, obj_cfg=obj,
                                       optimizer=optimizer))
  cosine_fn = jax.jit(functools.partial(losses.grad_cosine_token_seq, model_cfg=MODEL,
                                        obj_cfg=obj))
  mesh = sharding.make_mesh({})
  # Placed as the run places them, so each program compiles once for all the calls below.
  state0 = jax.device_put(train_state.init_state(params, optimizer), sharding.replicated(mesh))
  params = state0.params
  state, metrics = step.minibatch_updates(
      state0, full, 5, train_fn=train_fn, cosine_fn=cosine_fn, seed=0, mini_batch_size=4,
      mesh=mesh)
  rows = step.minibatch_rows(0, 5, 8, 4)
  mbs = [sharding.shard_batch(step.minibatch(full, r), mesh) for r in rows]
  first = cosine_fn(params, mbs[0])
  after_first, _ = train_fn(
      jax.device_put(train_state.init_state(params, optimizer), sharding.replicated(mesh)), mbs[0])
  last = cosine_fn(after_first.params, mbs[1])
  assert metrics["is/grad_cosine_token_seq"] == pytest.approx(float(first), abs=1e-6)
  assert metrics["is/grad_cosine_token_seq_last"] == pytest.approx(float(last), abs=1e-6)
  # pi_theta has moved by the last mini-batch: the two cosines differ.
  assert metrics["is/grad_cosine_token_seq"] != metrics["is/grad_cosine_token_seq_last"]
  assert int(state.step) == 2 and not any(k.startswith("mismatch/") for k in metrics)
