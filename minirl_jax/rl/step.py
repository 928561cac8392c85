"""One synchronous RL step as data flow, each call a pure function of explicit arguments:

    rollout = sample(sampler_params, prompts, key)      # inference engine (rl/rollout.py)
    rewards, m = score(rollout, prompts)                # R(x, y) (rl/rollout.py)
    advantages, m = advantages(rewards)                 # group-relative A
    batch, m = pi_old(params, rollout, advantages)      # pi_old -> TrainBatch
    state, m = minibatch_updates(state, batch, step)    # N x rl_step on mini-batches

then `quantize.for_sampler(state.params)` is the next step's rollout policy; `sft_step` is
the cold start's update. `rl.wiring.bind` closes them over a run's settings, mesh and data.
Which experts are replayed is decided in one place, `replayed_routing`; routing keeps one
layout, [L, B, T, k], from the sampler to the update.
"""
from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax import metrics as metrics_lib
from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.objectives import advantages as advantages_lib
from minirl_jax.objectives.config import BehaviourLogp
from minirl_jax.rl import losses
from minirl_jax.rl import micro
from minirl_jax.rl import train_state
from minirl_jax.rl.settings import RoutingReplay
from minirl_jax.sampling import sampler

# Every metric an update reports, with how it reduces over micro- and mini-batches, as
# its producers declare it (`minirl_jax.metrics`).
STEP_METRICS = metrics_lib.merge_rules(objectives.METRICS, losses.METRICS, train_state.METRICS)


@flax.struct.dataclass
class PolicyForward:
  """The training engine's forward over a rollout (pi_old, no gradient)."""
  logp: jax.Array = batch_lib.field("batch", "time")
  # routing dtype: the experts that ran, and the trainer router's own top-k (equal when
  # nothing is replayed)
  routing: jax.Array = batch_lib.field("layers", "batch", "time", "top_k")
  live_routing: jax.Array = batch_lib.field("layers", "batch", "time", "top_k")


def replayed_routing(replay: RoutingReplay, rollout: sampler.Rollout,
                     forward: Optional[PolicyForward] = None) -> Optional[jax.Array]:
  """The experts a forward replays (None: it routes live): pi_old's forward when `forward`
  is None, else the updates', given pi_old's `forward`."""
  if forward is None:
    return rollout.routing_mu if replay is RoutingReplay.R3 else None
  return {RoutingReplay.NONE: None, RoutingReplay.R2: forward.routing,
          RoutingReplay.R3: rollout.routing_mu}[replay]


def pi_old_forward(params, rollout: sampler.Rollout, replay: RoutingReplay, *,
                   model_cfg: ModelConfig, micro_batches: int = 1) -> PolicyForward:
  """pi_old over the rollout's rows in `micro_batches` slices (sliced by each record's
  declared axes, routing on its row axis)."""
  def forward(rows: sampler.Rollout) -> PolicyForward:
    logp, _, aux = transformer.token_logp_entropy(
        params, rows.tokens, cfg=model_cfg, attn_mask_BT=rows.attn_mask,
        routing=replayed_routing(replay, rows))
    return PolicyForward(logp=logp, routing=aux.routing, live_routing=aux.live_routing)
  out = micro.map_batch(forward, rollout, micro_batches)
  return out if micro_batches == 1 else micro.join_rows(out)


def advantages(rewards: jax.Array, *, group_size: int, obj_cfg: objectives.ObjectiveConfig):
  """Group-relative advantages of the global batch's rewards, and `reward/zero_adv_frac`
  (the fraction of prompt groups whose rewards are all equal: no learning signal)."""
  adv = objectives.group_advantages(rewards, group_size, obj_cfg.use_normalize_std,
                                    obj_cfg.std_ddof)
  return adv, {"reward/zero_adv_frac": _zero_advantage_frac(rewards, group_size)}


# Jitted like `minibatch` (one dispatch on global arrays); the advantages stay eager, as
# before this metric existed, so their values are unchanged.
_zero_advantage_frac = jax.jit(advantages_lib.zero_advantage_frac, static_argnums=1)


def pi_old(params, rollout: sampler.Rollout, advantages: jax.Array, *,
           model_cfg: ModelConfig, obj_cfg: objectives.ObjectiveConfig,
           routing_replay: RoutingReplay, group_size: int, micro_batches: int = 1):
  """pi_old by the training engine and the global TrainBatch the updates consume.

  Args:
    params: the weights the sampler used (before any update of this step).
    rollout: the sampler's output.
    advantages: [B * G] group-relative advantages.
    model_cfg, obj_cfg: the trainer's model and the objective.
    routing_replay: a `RoutingReplay` (or its string): "none", "r2" (replay the experts
      this forward chose) or "r3" (replay the sampler's, here and in every update).
    group_size: G, responses per prompt (rows of a group are contiguous).
    micro_batches: the forward runs over this many slices of the rows.

  Returns:
    (TrainBatch, metrics measured on the whole batch: train-infer mismatch, lengths and
    `moe/routing_disagreement` between the sampler's and the trainer router's own top-k).
  """
  replay = RoutingReplay(routing_replay)
  forward = pi_old_forward(params, rollout, replay, model_cfg=model_cfg,
                           micro_batches=micro_batches)
  old_logp = forward.logp
  # The behaviour policy: what the tokens were drawn from (objective.behaviour_logp);
  # "pi_old" is the zero-gap control, mu_old := pi_old exactly.
  mu_logp = {BehaviourLogp.PROCESSED: rollout.sample_logp, BehaviourLogp.RAW: rollout.mu_logp,
             BehaviourLogp.PI_OLD: old_logp}[obj_cfg.behaviour_logp]
  lengths_B = jnp.sum(rollout.completion_mask, axis=1)
  group_mean_B = jnp.repeat(jnp.mean(lengths_B.reshape(-1, group_size), axis=1), group_size)
  batch = batch_lib.TrainBatch(
      tokens=rollout.tokens, attn_mask=rollout.attn_mask, loss_mask=rollout.completion_mask,
      advantages=advantages, old_logp=old_logp, mu_logp=mu_logp,
      num_sequences=jnp.float32(rollout.tokens.shape[0]),
      num_tokens=jnp.maximum(jnp.sum(lengths_B), 1.0),
      routing=replayed_routing(replay, rollout, forward),
      group_length_mean=group_mean_B)
  metrics = dict(objectives.diagnostics.mismatch_metrics(batch))
  metrics["rollout/tokens"] = jnp.sum(lengths_B)
  metrics["rollout/length_mean"] = jnp.mean(lengths_B)
  # The sampler's token entropy, by Monte Carlo: its tokens' -log-prob under the
  # distribution that drew them (policy/entropy is the trainer's, exact).
  metrics["rollout/sampler_entropy"] = -(jnp.sum(rollout.sample_logp * rollout.completion_mask)
                                         / jnp.maximum(jnp.sum(lengths_B), 1.0))
  metrics["moe/routing_disagreement"] = routing_disagreement(
      rollout.routing_mu, forward.live_routing, rollout.attn_mask)
  return batch, metrics


def routing_disagreement(routing_a, routing_b, valid_BT):
  """Fraction of (layer, token) top-k expert SETS that differ; -1 entries are skipped."""
  if routing_a.shape[0] == 0:
    return jnp.float32(0.0)
  a = jnp.sort(routing_a.astype(jnp.int32), axis=-1)
  b = jnp.sort(routing_b.astype(jnp.int32), axis=-1)
  counted = (routing_a[..., 0] >= 0) & (routing_b[..., 0] >= 0) & valid_BT[None]
  differ = jnp.any(a != b, axis=-1) & counted
  return jnp.sum(differ) / jnp.maximum(jnp.sum(counted), 1)


# Jitted: one dispatch instead of dozens of small eager ops on global arrays per step, which
# on multi-process XLA:CPU could fill a device's in-flight queue and deadlock a collective.
@jax.jit
def minibatch(full: batch_lib.TrainBatch, rows: jax.Array) -> batch_lib.TrainBatch:
  """Rows `rows` of the global batch, normalised by the mini-batch's GLOBAL counts.

  `group_length_mean` keeps its global-batch value: a group's token count does not change
  when its rows land in different mini-batches.
  """
  take = lambda x, axis: x if axis is None else jnp.take(jnp.asarray(x), rows, axis=axis)
  mb = batch_lib.map_rows(take, full)
  return mb.replace(num_sequences=jnp.float32(len(rows)),
                    num_tokens=jnp.maximum(jnp.sum(mb.loss_mask), 1.0))


def minibatch_rows(seed: int, step: int, global_batch: int, mini_batch_size: int):
  """The rows of each mini-batch of RL step `step`: a permutation seeded by (seed, step)."""
  perm = np.random.default_rng([seed, step]).permutation(global_batch)
  return perm.reshape(-1, mini_batch_size)


def minibatch_updates(state, batch: batch_lib.TrainBatch, step: int, *, train_fn: Callable,
                      cosine_fn: Optional[Callable], seed: int, mini_batch_size: int, mesh):
  """N = global batch / mini-batch size optimizer updates over a random split.

  Args:
    state: the TrainState (donated to `train_fn`).
    batch: the global TrainBatch from `pi_old`.
    step: the RL step (seeds the split).
    train_fn: `(state, mini_batch) -> (state, metrics)`, the jitted `rl_step`.
    cosine_fn: `(params, mini_batch) -> cosine` of the J_token and J_seq gradients, measured
      on the first mini-batch (pi_theta = pi_old) and the last (staleness largest) before
      their updates; None skips it.
    seed: the run's seed.
    mini_batch_size: sequences per update.
    mesh: the run's mesh.

  Returns:
    (state, metrics reduced over the mini-batches by `reduce_minibatch_metrics`).
  """
  rows = minibatch_rows(seed, step, batch.tokens.shape[0], mini_batch_size)
  per_update, cosines = [], {}
  for i, mb_rows in enumerate(rows):
    mb = sharding.shard_batch(minibatch(batch, mb_rows), mesh)
    if cosine_fn is not None and i in (0, len(rows) - 1):
      cosine = cosine_fn(state.params, mb)
      if i == 0:
        cosines["is/grad_cosine_token_seq"] = cosine
      if i == len(rows) - 1:
        cosines["is/grad_cosine_token_seq_last"] = cosine
    state, metrics = train_fn(state, mb)
    per_update.append((metrics, mb.num_tokens))
  per_update, cosines = jax.device_get((per_update, cosines))
  return state, {**reduce_minibatch_metrics(per_update), **cosines}


def reduce_minibatch_metrics(per_update) -> dict[str, float]:
  """One step value per metric from `[(metrics, num_tokens)]` of the N updates, each by its
  declared rule (`STEP_METRICS`)."""
  return metrics_lib.over_mini_batches(per_update, STEP_METRICS)


def sft_step(state: train_state.TrainState, batch: dict, *, model_cfg, optimizer,
             micro_batches: int = 1):
  """One cold-start update: token cross-entropy on the solutions, in `micro_batches`."""
  batch = {**batch, "num_tokens": jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)}
  loss = lambda params, mb, aux_weight: losses.sft_loss(params, mb, model_cfg, aux_weight)
  (loss, metrics), grads = micro.value_and_grad(loss, state.params, batch, micro_batches,
                                                STEP_METRICS)
  state, opt_metrics = train_state.apply_update(state, loss, grads, optimizer)
  return state, {**metrics, **opt_metrics}


def rl_step(state: train_state.TrainState, batch: batch_lib.TrainBatch, *, model_cfg, obj_cfg,
            optimizer, micro_batches: int = 1):
  """One optimizer update on one mini-batch of the objective `obj_cfg.name`, its gradient
  accumulated over `micro_batches` slices (`rl.micro`)."""
  loss = lambda params, mb, aux_weight: losses.policy_loss(
      params, mb, model_cfg, obj_cfg, objectives.OBJECTIVES[obj_cfg.name], aux_weight)
  (loss, metrics), grads = micro.value_and_grad(loss, state.params, batch, micro_batches,
                                                STEP_METRICS)
  state, opt_metrics = train_state.apply_update(state, loss, grads, optimizer)
  return state, {**metrics, **opt_metrics}
