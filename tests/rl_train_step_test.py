"""RL and SFT update steps: every objective x routing replay mode, replay semantics, SFT."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax.data import pipeline
from minirl_jax.data import tasks
from minirl_jax.data import tokenizer as tokenizer_lib
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import settings
from minirl_jax.rl import losses
from minirl_jax.rl import step as step_lib
from minirl_jax.rl import train_state
from minirl_jax.sampling import config as sampler_config
from minirl_jax.sampling import quantize
from minirl_jax.sampling import sampler

MODEL = ModelConfig(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, expert_ffn_dim=32)
SAMPLER = sampler_config.SamplerConfig(dtype="int8", max_new_tokens=6, prompt_bucket=4)
OPTIM = settings.OptimConfig(learning_rate=1e-2)
AXES = transformer.param_axes(MODEL)


@pytest.fixture(scope="module")
def setup():
  """A real int8 rollout of 8 sequences (2 prompts x 4) and pi_old on it."""
  params = transformer.init_params(MODEL, jax.random.key(0))
  prompts = jnp.array([[0, 5, 6, 7], [8, 9, 10, 11]] * 4)
  lengths = jnp.array([3, 4] * 4)
  rollout = sampler.generate(quantize.quantize(params, "int8", AXES), prompts, lengths,
                             jax.random.key(1), model_cfg=MODEL, sampler_cfg=SAMPLER)
  old = jax.jit(functools.partial(step_lib.pi_old_forward, replay=step_lib.RoutingReplay.NONE,
                                  model_cfg=MODEL))
  forward = old(params, rollout)
  old_logp, routing_old = forward.logp, forward.routing
  advantages = jnp.array([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.0, 0.0])
  batch = batch_lib.TrainBatch(
      tokens=rollout.tokens, attn_mask=rollout.attn_mask, loss_mask=rollout.completion_mask,
      advantages=advantages, old_logp=old_logp, mu_logp=rollout.mu_logp,
      num_sequences=jnp.float32(8), num_tokens=jnp.sum(rollout.completion_mask))
  return params, rollout, routing_old, batch


OPTIMIZER = train_state.make_optimizer(OPTIM, AXES)


@functools.cache
def jitted_rl_step(objective):
  """One compiled step per objective, shared by the replay modes (R2 and R3 share a trace)."""
  return jax.jit(functools.partial(step_lib.rl_step, model_cfg=MODEL, optimizer=OPTIMIZER,
                                   obj_cfg=objectives.ObjectiveConfig(name=objective)))


# Every objective and every replay mode, not every pair: each objective is a compile, and
# the objectives do not depend on where the routing came from.
@pytest.mark.parametrize("objective,replay", [("minirl", "r3"), ("grpo", "none"),
                                              ("cispo", "r2")])
def test_rl_step_every_objective_and_replay_mode(setup, objective, replay):
  params, rollout, routing_old, batch = setup
  routing = {"none": None, "r2": routing_old, "r3": rollout.routing_mu}[replay]
  step = jitted_rl_step(objective)
  state = train_state.init_state(params, OPTIMIZER)
  new_state, metrics = step(state, batch.replace(routing=routing))
  chex.assert_tree_all_finite(metrics)
  assert int(new_state.step) == 1 and float(metrics["optim/update_norm"]) > 0
  assert float(metrics["policy/entropy"]) > 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, new_state.params)
  assert max(jax.tree.leaves(moved)) > 0


def test_replayed_routing_is_what_the_update_runs(setup):
  """Under R3 the loss is computed with the sampler's experts, not the trainer's own."""
  params, rollout, routing_old, batch = setup
  obj_cfg = objectives.ObjectiveConfig()
  loss = jax.jit(lambda routing: losses.policy_loss(
      params, batch.replace(routing=routing), MODEL, obj_cfg, objectives.OBJECTIVES["minirl"])[0])
  flipped = jnp.where(rollout.routing_mu >= 0, (rollout.routing_mu + 1) % MODEL.num_experts,
                      rollout.routing_mu).astype(rollout.routing_mu.dtype)
  assert float(loss(routing_old)) == pytest.approx(float(loss(None)), abs=1e-6)
  assert abs(float(loss(flipped)) - float(loss(None))) > 1e-6


def test_pi_old_forward_replays_and_reports_live_topk(setup):
  params, rollout, routing_old, _ = setup
  pi_old_forward = lambda replay: jax.jit(functools.partial(
      step_lib.pi_old_forward, replay=replay, model_cfg=MODEL))(params, rollout)
  forward = pi_old_forward(step_lib.RoutingReplay.NONE)
  routing, live = forward.routing, forward.live_routing
  same = np.sort(np.asarray(routing), -1) == np.sort(np.asarray(live), -1)
  assert same.all()  # no replay: the experts that ran are the router's own top-k
  routing_r3 = pi_old_forward(step_lib.RoutingReplay.R3).routing
  ran = np.asarray(rollout.routing_mu)[..., 0] >= 0
  np.testing.assert_array_equal(np.asarray(routing_r3)[ran], np.asarray(rollout.routing_mu)[ran])


def test_sft_loss_decreases():
  tok = tokenizer_lib.CharTokenizer()
  task = tasks.ArithmeticTask(max_value=20)
  data = iter(pipeline.sft_dataset(tasks.TrainSource(task, seed=0, size=512), tok,
                                   global_batch_size=32, max_prompt_len=8, max_len=18, seed=0,
                                   check_lengths=False))
  optimizer = train_state.make_optimizer(settings.OptimConfig(learning_rate=3e-3), AXES)
  state = train_state.init_state(transformer.init_params(MODEL, jax.random.key(0)), optimizer)
  step = jax.jit(functools.partial(step_lib.sft_step, model_cfg=MODEL, optimizer=optimizer))
  losses = []
  for _ in range(40):
    state, m = step(state, next(data))
    losses.append(float(m["sft/loss"]))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_nonfinite_gradient_skips_the_update(setup):
  params, _, _, batch = setup
  step = jitted_rl_step("minirl")
  state = train_state.init_state(params, OPTIMIZER)
  bad = batch.replace(advantages=batch.advantages.at[0].set(jnp.nan))
  new_state, metrics = step(state, bad)
  assert float(metrics["optim/skipped"]) == 1.0
  chex.assert_trees_all_equal(new_state.params, params)


def test_entropy_metric_is_of_the_distribution_each_response_token_was_drawn_from(setup):
  params, _, _, batch = setup
  _, metrics = jax.jit(losses.policy_loss, static_argnums=(2, 3, 4))(
      params, batch, MODEL, objectives.ObjectiveConfig(), objectives.OBJECTIVES["minirl"])
  logits, _ = jax.jit(transformer.forward, static_argnames="cfg")(
      params, batch.tokens, cfg=MODEL, attn_mask_BT=batch.attn_mask)
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  entropy = -np.sum(p * np.log(p), axis=-1)  # [B, T]: of the token at t + 1
  mask = np.asarray(batch.loss_mask)
  # Response token t was drawn from logits[t - 1]: shift by one; the first response token
  # counts and the position after the last one does not.
  want = float(np.sum(entropy[:, :-1] * mask[:, 1:]) / mask.sum())
  assert float(metrics["policy/entropy"]) == pytest.approx(want, rel=1e-5)
  unshifted = float(np.sum(entropy * mask) / mask.sum())
  assert abs(want - unshifted) > 1e-3  # the test tells the two alignments apart


def test_weight_decay_reaches_matrices_and_never_norm_gains():
  params = transformer.init_params(MODEL, jax.random.key(0))
  optimizer = train_state.make_optimizer(
      settings.OptimConfig(learning_rate=0.1, weight_decay=0.5), AXES)
  state = train_state.init_state(params, optimizer)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero, state.opt_state, params)
  # With zero gradients the whole update is -lr * wd * w on decayed weights, 0 elsewhere.
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = jax.tree_util.keystr(path)
    w = params
    for key in path:
      w = w[key.key]
    if "norm" in name:
      assert float(jnp.max(jnp.abs(u))) == 0.0, name
    else:
      np.testing.assert_allclose(u, -0.1 * 0.5 * w, rtol=1e-6, err_msg=name)
