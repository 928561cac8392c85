"""The training engine: train state, optimizer, and the pure SFT / RL update steps."""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax.models import transformer
from minirl_jax.models import weights
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import micro
from minirl_jax.rl.settings import OptimConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, optimizer updates so far
  params: Any
  opt_state: Any


def make_optimizer(cfg: OptimConfig, axes) -> optax.GradientTransformation:
  """The optimizer of one stage.

  Args:
    cfg: its settings.
    axes: `transformer.param_axes(model_cfg)`: weight decay reaches exactly the weights
      that are not norm gains (`weights.decay_mask`).
  """
  schedule = optax.schedules.join_schedules(
      [optax.schedules.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)),
       optax.schedules.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=weights.decay_mask(axes)))


def init_state(params, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


# What must be finite for an update to be applied, in the order a stop message names them.
GUARDED = ("loss", "gradients", "update", "parameters")


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _apply(state: TrainState, loss, grads, optimizer) -> tuple[TrainState, dict]:
  """One optimizer update, applied only if the loss, gradients, update and new parameters
  are all finite; otherwise the state (optimizer moments and step included) is left as it
  was, `optim/skipped` is 1 and `optim/nonfinite_<quantity>` says what was not finite."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = {name: _all_finite(x) for name, x in zip(GUARDED, (loss, grads, updates, params))}
  ok = jnp.all(jnp.stack(list(finite.values())))
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
  metrics = {"optim/grad_norm": optax.tree.norm(grads),
             "optim/update_norm": optax.tree.norm(updates),
             "optim/skipped": 1.0 - ok.astype(jnp.float32),
             **{f"optim/nonfinite_{name}": 1.0 - f.astype(jnp.float32)
                for name, f in finite.items()}}
  return state, metrics


def sft_loss(params, batch: dict, model_cfg: ModelConfig, aux_weight: float = 1.0):
  """Teacher-forced token cross-entropy on the solution tokens (cold start), normalised by
  `batch["num_tokens"]` (the whole batch's loss tokens, also in each micro-batch)."""
  logp, _, aux = transformer.token_logp_entropy(params, batch["tokens"], cfg=model_cfg,
                                                attn_mask_BT=batch["attn_mask"])
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = -jnp.sum(logp * mask) / batch["num_tokens"]
  return nll + aux_weight * aux.aux_loss, {
      "sft/loss": nll, "moe/load_balance_loss": aux.load_balance_loss,
                              "moe/load_max": jnp.max(aux.expert_load, initial=0.0)}


def sft_step(state: TrainState, batch: dict, *, model_cfg, optimizer, micro_batches: int = 1):
  batch = {**batch, "num_tokens": jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)}
  loss = lambda params, mb, aux_weight: sft_loss(params, mb, model_cfg, aux_weight)
  (loss, metrics), grads = micro.value_and_grad(loss, state.params, batch, micro_batches)
  state, opt_metrics = _apply(state, loss, grads, optimizer)
  return state, {**metrics, **opt_metrics}


def _policy_logp(params, batch: batch_lib.TrainBatch, model_cfg: ModelConfig):
  """Teacher-forced (log pi_theta, entropy, aux), replaying `batch.routing` if set."""
  return transformer.token_logp_entropy(params, batch.tokens, cfg=model_cfg,
                                        attn_mask_BT=batch.attn_mask, routing=batch.routing)


def policy_loss(params, batch: batch_lib.TrainBatch, model_cfg: ModelConfig,
                obj_cfg: objectives.ObjectiveConfig, loss_fn: Callable,
                aux_weight: float = 1.0):
  """The objective plus `aux_weight` x the MoE aux loss, with the objective's metrics and
  the entropy."""
  logp, entropy_BT, aux = _policy_logp(params, batch, model_cfg)
  loss, metrics = loss_fn(logp, batch, obj_cfg)
  entropy = objectives.masked_mean(entropy_BT, batch.loss_mask, batch.num_tokens)
  metrics = {**metrics, "policy/entropy": entropy, "policy/loss": loss,
             "moe/load_balance_loss": aux.load_balance_loss,
             "moe/load_max": jnp.max(aux.expert_load, initial=0.0)}
  return loss + aux_weight * aux.aux_loss, metrics


def rl_step(state: TrainState, batch: batch_lib.TrainBatch, *, model_cfg, obj_cfg, optimizer,
            micro_batches: int = 1):
  """One optimizer update on one mini-batch of the objective `obj_cfg.name`, its gradient
  accumulated over `micro_batches` slices (`rl.micro`)."""
  loss = lambda params, mb, aux_weight: policy_loss(
      params, mb, model_cfg, obj_cfg, objectives.OBJECTIVES[obj_cfg.name], aux_weight)
  (loss, metrics), grads = micro.value_and_grad(loss, state.params, batch, micro_batches)
  state, opt_metrics = _apply(state, loss, grads, optimizer)
  return state, {**metrics, **opt_metrics}


def grad_cosine_token_seq(params, batch: batch_lib.TrainBatch, *, model_cfg, obj_cfg,
                          micro_batches: int = 1):
  """Cosine between the parameter gradients of J_token (the objective) and J_seq (Eq. 1).

  Near 1 while the first-order approximation holds: the paper's thesis, measured. The MoE
  aux loss is left out, since a term shared by both would pull the cosine towards 1.
  """
  def grad_of(loss_fn):
    objective = lambda p, mb, _: (loss_fn(_policy_logp(p, mb, model_cfg)[0], mb, obj_cfg)[0],
                                  {})
    return micro.value_and_grad(objective, params, batch, micro_batches)[1]
  return objectives.grad_cosine(grad_of(objectives.OBJECTIVES[obj_cfg.name]),
                                grad_of(objectives.sequence_loss))


def old_policy(params, tokens, attn_mask, routing, *, model_cfg, micro_batches: int = 1):
  """pi_old by the training engine (no gradient), its routing, and its own top-k choice,
  over `micro_batches` slices of the rows.

  Returns:
    (old_logp_BT, routing_LBTk: experts that ran, live_topk_LBTk: the trainer router's own
    top-k at every layer, which equals the routing when nothing is replayed).
  """
  rows_first = lambda r: None if r is None else jnp.moveaxis(r, 0, 1)  # [L, B] <-> [B, L]

  def forward(xs):
    tokens, attn_mask, routing = xs
    logp, _, aux = transformer.token_logp_entropy(params, tokens, cfg=model_cfg,
                                                  attn_mask_BT=attn_mask,
                                                  routing=rows_first(routing))
    return logp, rows_first(aux.routing), rows_first(aux.live_routing)

  out = micro.map_batch(forward, (tokens, attn_mask, rows_first(routing)), micro_batches)
  if micro_batches > 1:
    out = jax.tree.map(micro.join, out)
  logp, ran, live = out
  return logp, rows_first(ran), rows_first(live)
