"""One synchronous RL step as five calls, and the training-engine half of them.

    rollout = fns.sample(sampler_params, prompts, key)      # inference engine: mu, routing_mu
    rewards, m = fns.score(rollout, prompts)                # R(x, y)
    advantages, m = fns.advantages(rewards)                 # group-relative A
    batch, m = fns.old_policy(state.params, rollout, advantages)  # pi_old -> TrainBatch
    state, m = fns.update(state, batch, step)               # N mini-batch updates

then `fns.quantize(state.params)` is the next step's rollout policy. `bind` closes every
call over a run's settings, mesh and data once; each underlying function takes only the
configs it needs and is usable on its own.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax import sharding
from minirl_jax.data import scoring
from minirl_jax.objectives import advantages as advantages_lib
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import rollout as rollout_lib
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_step
from minirl_jax.sampling import quantize as quantize_lib
from minirl_jax.sampling import sampler

# Metrics measured once on the whole global batch (`old_policy`); the objectives report
# them per mini-batch too, and those partial values are dropped so they never overwrite.
FULL_BATCH_PREFIXES = ("mismatch/",)
# Per-mini-batch means over loss tokens: the step's value weights each by its token count.
TOKEN_MEANS = ("policy/entropy", "policy/ratio_mean", "policy/clip_frac",
               "policy/clip_frac_high", "policy/clip_frac_low", "is/weight_mean",
               "is/frac_truncated", "staleness/abs_log_pi_pi_old")


def advantages(rewards: jax.Array, *, group_size: int, obj_cfg: objectives.ObjectiveConfig):
  """Group-relative advantages of the global batch's rewards, and `reward/zero_adv_frac`
  (the fraction of prompt groups whose rewards are all equal: no learning signal)."""
  adv = objectives.group_advantages(rewards, group_size, obj_cfg.use_normalize_std,
                                    obj_cfg.std_ddof)
  return adv, {"reward/zero_adv_frac": _zero_advantage_frac(rewards, group_size)}


# Jitted like `minibatch` (one dispatch on global arrays); the advantages stay eager, as
# before this metric existed, so their values are unchanged.
_zero_advantage_frac = jax.jit(advantages_lib.zero_advantage_frac, static_argnums=1)


def old_policy(params, rollout: sampler.Rollout, advantages: jax.Array, *,
               model_cfg: ModelConfig, obj_cfg: objectives.ObjectiveConfig,
               routing_replay: str, group_size: int, micro_batches: int = 1):
  """pi_old by the training engine and the global TrainBatch the updates consume.

  Args:
    params: the weights the sampler used (before any update of this step).
    rollout: the sampler's output.
    advantages: [B * G] group-relative advantages.
    model_cfg, obj_cfg: the trainer's model and the objective.
    routing_replay: "none", "r2" (replay the experts this forward chose) or "r3" (replay
      the sampler's, here and in every update).
    group_size: G, responses per prompt (rows of a group are contiguous).
    micro_batches: the forward runs over this many slices of the rows.

  Returns:
    (TrainBatch, metrics measured on the whole batch: train-infer mismatch, lengths and
    `moe/routing_disagreement` between the sampler's and the trainer router's own top-k).
  """
  replay_old = rollout.routing_mu if routing_replay == "r3" else None
  old_logp, routing_old, live_routing = train_step.old_policy(
      params, rollout.tokens, rollout.attn_mask, replay_old, model_cfg=model_cfg,
      micro_batches=micro_batches)
  # The behaviour policy: what the tokens were drawn from (objective.behaviour_logp);
  # "pi_old" is the zero-gap control, mu_old := pi_old exactly.
  mu_logp = {"processed": rollout.sample_logp, "raw": rollout.mu_logp,
             "pi_old": old_logp}[obj_cfg.behaviour_logp]
  lengths_B = jnp.sum(rollout.completion_mask, axis=1)
  group_mean_B = jnp.repeat(jnp.mean(lengths_B.reshape(-1, group_size), axis=1), group_size)
  batch = batch_lib.TrainBatch(
      tokens=rollout.tokens, attn_mask=rollout.attn_mask, loss_mask=rollout.completion_mask,
      advantages=advantages, old_logp=old_logp, mu_logp=mu_logp,
      num_sequences=jnp.float32(rollout.tokens.shape[0]),
      num_tokens=jnp.maximum(jnp.sum(lengths_B), 1.0),
      routing={"none": None, "r2": routing_old, "r3": rollout.routing_mu}[routing_replay],
      group_length_mean=group_mean_B)
  metrics = dict(objectives.diagnostics.mismatch_metrics(batch))
  metrics["rollout/tokens"] = jnp.sum(lengths_B)
  metrics["rollout/length_mean"] = jnp.mean(lengths_B)
  metrics["moe/routing_disagreement"] = routing_disagreement(
      rollout.routing_mu, live_routing, rollout.attn_mask)
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
    batch: the global TrainBatch from `old_policy`.
    step: the RL step (seeds the split).
    train_fn: `(state, mini_batch) -> (state, metrics)`, the jitted `train_step.rl_step`.
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
  """One step value per metric from `[(metrics, num_tokens)]` of the N updates.

  `*_max` take the maximum, `TOKEN_MEANS` the token-weighted mean, everything else the
  plain mean (per-sequence means over equal-size mini-batches, losses, norms, `optim/skipped`
  as the fraction of skipped updates). `FULL_BATCH_PREFIXES` metrics are dropped.
  """
  weights = np.array([float(n) for _, n in per_update])
  out = {}
  for key in per_update[0][0]:
    if key.startswith(FULL_BATCH_PREFIXES):
      continue
    values = np.array([float(m[key]) for m, _ in per_update])
    if key.endswith("_max"):
      out[key] = float(values.max())
    elif key in TOKEN_MEANS:
      out[key] = float(np.sum(values * weights) / np.sum(weights))
    else:
      out[key] = float(values.mean())
  return out


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """One run's RL step calls (module docstring), bound once by `bind`."""
  sample: Callable      # (sampler_params, prompts, key, group_size=G) -> Rollout
  score: Callable       # (rollout, prompts, group_size=G) -> (rewards, metrics)
  advantages: Callable  # (rewards) -> (advantages, metrics)
  old_policy: Callable  # (params, rollout, advantages) -> (TrainBatch, metrics)
  update: Callable      # (state, batch, step) -> (state, metrics)
  quantize: Callable    # (params) -> sampler params
  sft_update: Callable  # (state, batch) -> (state, metrics)
  rl_optimizer: Any     # optax transformation `update` applies
  evaluate: Callable    # (sampler_params, batches, key, samples=1) -> {avg@k, pass@k}
  scorer: scoring.RewardScorer

  def close(self):
    """Stops the reward workers."""
    self.scorer.close()


def bind(s: settings_lib.Settings, mesh, tokenizer, reward_fn, state_sharding=None):
  """Closes the step's functions over a run's settings, mesh and data.

  Args:
    s: the run's settings.
    mesh: its mesh.
    tokenizer: decodes completions for the reward.
    reward_fn: R(prompt, completion, answer), run in worker processes under a timeout.
    state_sharding: the TrainState's shardings (the updates keep the state there); None
      for evaluation-only use.
  """
  scorer = scoring.RewardScorer(reward_fn, timeout_s=s.data.reward_timeout_s)
  sample = functools.partial(rollout_lib.sample, group_size=s.rl.group_size,
                             model_cfg=s.model, sampler_cfg=s.sampler, mesh=mesh)
  eval_score = functools.partial(rollout_lib.score, group_size=s.rl.group_size, scorer=scorer,
                                 tokenizer=tokenizer, eos_ids=s.sampler.eos_ids, mesh=mesh)
  # Only training steps count towards stopping a run whose reward function keeps failing.
  score = functools.partial(eval_score,
                            streak=scoring.ErrorStreak(s.data.reward_max_error_frac))
  step_kw = dict(donate_argnums=0)
  if state_sharding is not None:
    step_kw["out_shardings"] = (state_sharding, sharding.replicated(mesh))
  axes = transformer.param_axes(s.model)
  rl_optimizer = train_step.make_optimizer(s.rl_optim(), axes)
  micro_batches = s.rl.micro_per_update
  on_mesh = functools.partial(sharding.on_mesh, mesh)
  rl_step = on_mesh(jax.jit(functools.partial(train_step.rl_step, model_cfg=s.model,
                                              obj_cfg=s.objective, optimizer=rl_optimizer,
                                              micro_batches=micro_batches), **step_kw))
  cosine = None
  if s.objective.grad_cosine_every:
    cosine = on_mesh(jax.jit(functools.partial(
        train_step.grad_cosine_token_seq, model_cfg=s.model, obj_cfg=s.objective,
        micro_batches=micro_batches)))
  every = s.objective.grad_cosine_every

  def update(state, batch, step):
    due = every and step % every == 0
    return minibatch_updates(state, batch, step, train_fn=rl_step,
                             cosine_fn=cosine if due else None, seed=s.seed,
                             mini_batch_size=s.rl.mini_batch_size, mesh=mesh)

  return StepFunctions(
      sample=sample, score=score,
      advantages=functools.partial(advantages, group_size=s.rl.group_size,
                                   obj_cfg=s.objective),
      old_policy=on_mesh(jax.jit(functools.partial(
          old_policy, model_cfg=s.model, obj_cfg=s.objective,
          routing_replay=s.rl.routing_replay, group_size=s.rl.group_size,
          micro_batches=s.rl.micro_per_global_batch))),
      update=update,
      quantize=lambda params: quantize_lib.for_sampler(params, s.sampler, axes),
      sft_update=on_mesh(jax.jit(functools.partial(
          train_step.sft_step, model_cfg=s.model,
          optimizer=train_step.make_optimizer(s.sft_optim(), axes),
          micro_batches=s.sft.micro_per_update), **step_kw)),
      rl_optimizer=rl_optimizer,
      evaluate=functools.partial(rollout_lib.evaluate, sample_fn=sample, score_fn=eval_score,
                                 mesh=mesh),
      scorer=scorer)
