"""RL objectives (MiniRL, GRPO, CISPO and ablations), advantages and diagnostics."""
from minirl_jax.metrics import merge_rules
from minirl_jax.objectives import cispo
from minirl_jax.objectives import diagnostics
from minirl_jax.objectives import grpo
from minirl_jax.objectives import minirl
from minirl_jax.objectives import rollout_correction
from minirl_jax.objectives import sequence
from minirl_jax.objectives.advantages import group_advantages
from minirl_jax.objectives.config import ObjectiveConfig
from minirl_jax.objectives.diagnostics import first_order_error
from minirl_jax.objectives.diagnostics import grad_cosine
from minirl_jax.objectives.diagnostics import masked_mean
from minirl_jax.objectives.diagnostics import token_entropy

__all__ = [
    "METRICS", "OBJECTIVES", "ObjectiveConfig", "first_order_error", "grad_cosine",
    "group_advantages", "masked_mean", "sequence_loss", "token_entropy",
]

# name -> loss_fn(logp_BT, batch, cfg) -> (loss, metrics); select with `cfg.name`.
OBJECTIVES = {"minirl": minirl.loss, "grpo": grpo.loss, "cispo": cispo.loss}

# J_seq (Eq. 1), same signature: the reference for `is/grad_cosine_token_seq`.
sequence_loss = sequence.loss

# How every objective's metrics reduce (`minirl_jax.metrics`).
METRICS = merge_rules(diagnostics.METRICS, rollout_correction.METRICS, sequence.METRICS)
