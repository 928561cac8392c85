"""The losses the trainer differentiates: the cold start's cross-entropy, the policy
objective (any of `objectives.OBJECTIVES`) with the MoE aux loss, and the cosine between
the J_token and J_seq gradients (the paper's first-order check)."""
from typing import Callable

import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.metrics import Reduce
from minirl_jax.rl import micro


# How the losses' own metrics reduce (`minirl_jax.metrics`); the objective's are
# `objectives.METRICS`.
METRICS = {"sft/loss": Reduce.BATCH_MEAN, "policy/loss": Reduce.BATCH_MEAN,
           "policy/entropy": Reduce.TOKEN_MEAN, "moe/load_balance_loss": Reduce.FORWARD_MEAN,
           "moe/load_max": Reduce.MAX}


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


def policy_logp(params, batch: batch_lib.TrainBatch, model_cfg: ModelConfig):
  """Teacher-forced (log pi_theta, entropy, aux), replaying `batch.routing` if set."""
  return transformer.token_logp_entropy(params, batch.tokens, cfg=model_cfg,
                                        attn_mask_BT=batch.attn_mask, routing=batch.routing)


def policy_loss(params, batch: batch_lib.TrainBatch, model_cfg: ModelConfig,
                obj_cfg: objectives.ObjectiveConfig, loss_fn: Callable,
                aux_weight: float = 1.0):
  """The objective plus `aux_weight` x the MoE aux loss, with the objective's metrics and
  the entropy."""
  logp, entropy_BT, aux = policy_logp(params, batch, model_cfg)
  loss, metrics = loss_fn(logp, batch, obj_cfg)
  entropy = objectives.masked_mean(entropy_BT, batch.loss_mask, batch.num_tokens)
  metrics = {**metrics, "policy/entropy": entropy, "policy/loss": loss,
             "moe/load_balance_loss": aux.load_balance_loss,
             "moe/load_max": jnp.max(aux.expert_load, initial=0.0)}
  return loss + aux_weight * aux.aux_loss, metrics


def grad_cosine_token_seq(params, batch: batch_lib.TrainBatch, *, model_cfg, obj_cfg,
                          micro_batches: int = 1):
  """Cosine between the parameter gradients of J_token (the objective) and J_seq (Eq. 1).

  Near 1 while the first-order approximation holds: the paper's thesis, measured. The MoE
  aux loss is left out, since a term shared by both would pull the cosine towards 1.
  """
  def grad_of(loss_fn):
    objective = lambda p, mb, _: (loss_fn(policy_logp(p, mb, model_cfg)[0], mb, obj_cfg)[0],
                                  {})
    return micro.value_and_grad(objective, params, batch, micro_batches, rules={})[1]
  return objectives.grad_cosine(grad_of(objectives.OBJECTIVES[obj_cfg.name]),
                                grad_of(objectives.sequence_loss))
