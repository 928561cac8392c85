"""The records the sampler, objectives and trainer exchange."""
from typing import Optional

import flax
import jax


@flax.struct.dataclass
class TrainBatch:
  """One (mini-)batch of scored rollouts, aligned to token positions.

  `*_logp[b, t]` is the log-prob of `tokens[b, t]` given `tokens[b, :t]`; position 0 and
  every prompt or pad position carry `loss_mask == 0`.
  """
  tokens: jax.Array          # [B, T] int32, left-padded prompt + completion (+ right pad)
  attn_mask: jax.Array       # [B, T] bool, False on padding
  loss_mask: jax.Array       # [B, T] float32, 1 on completion tokens (EOS included)
  advantages: jax.Array      # [B] float32, one per sequence
  old_logp: jax.Array        # [B, T] float32, pi_old by the training engine
  mu_logp: jax.Array         # [B, T] float32, mu_old by the inference engine
  num_sequences: jax.Array   # [] float32, GLOBAL count of sequences in this (mini-)batch
  num_tokens: jax.Array      # [] float32, GLOBAL count of loss tokens in this (mini-)batch
  routing: Optional[jax.Array] = None  # [L, B, T, k] experts to replay (-1 = route live)
