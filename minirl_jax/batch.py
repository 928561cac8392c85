"""The records the sampler, objectives and trainer exchange, each field with its logical axes.

Sharding and slicing rows out of a record are tree maps over the declared axes
(`batch_axes`), never matches on field names.
"""
import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import numpy as np


def field(*axes: str, **kwargs):
  """A record field whose array has the logical `axes` ("batch" marks the rows)."""
  return flax.struct.field(metadata={"axes": axes}, **kwargs)


@flax.struct.dataclass
class TrainBatch:
  """One (mini-)batch of scored rollouts, aligned to token positions.

  `*_logp[b, t]` is the log-prob of `tokens[b, t]` given `tokens[b, :t]`; position 0 and
  every prompt or pad position carry `loss_mask == 0`.
  """
  tokens: jax.Array = field("batch", "time")      # int32, left-padded prompt + completion
  attn_mask: jax.Array = field("batch", "time")   # bool, False on padding
  loss_mask: jax.Array = field("batch", "time")   # float32, 1 on completion tokens (EOS too)
  advantages: jax.Array = field("batch")          # float32, one per sequence
  old_logp: jax.Array = field("batch", "time")    # float32, pi_old by the training engine
  mu_logp: jax.Array = field("batch", "time")     # float32, mu_old (behaviour policy)
  num_sequences: jax.Array = field()  # [] float32, GLOBAL count of sequences in this batch
  num_tokens: jax.Array = field()     # [] float32, GLOBAL count of loss tokens in this batch
  # Experts to replay (-1 = route live); None = route every token live.
  routing: Optional[jax.Array] = field("layers", "batch", "time", "top_k", default=None)
  # Mean response length of each row's prompt group over the GLOBAL batch; the per-group
  # token normaliser of `objective.token_norm="group"` (None when no objective needs it).
  group_length_mean: Optional[jax.Array] = field("batch", default=None)


def _declared(record) -> bool:
  return dataclasses.is_dataclass(record) and all(
      "axes" in f.metadata for f in dataclasses.fields(record))


def batch_axes(record) -> dict[str, Optional[int]]:
  """Field name -> index of its "batch" axis (None: no batch axis) of a record declared
  with `field`."""
  return {f.name: (f.metadata["axes"].index("batch") if "batch" in f.metadata["axes"]
                   else None) for f in dataclasses.fields(record)}


def map_rows(fn: Callable[[Any, Optional[int]], Any], batch):
  """`fn(array, batch_axis)` on every array of a batch; None stays None.

  A record declared with `field` uses its declared axes; any other pytree (e.g. the dict
  of [B, ...] arrays an input pipeline yields) has its rows on axis 0, scalars none.
  """
  if _declared(batch):
    values = {name: (None if getattr(batch, name) is None else fn(getattr(batch, name), axis))
              for name, axis in batch_axes(batch).items()}
    return batch.replace(**values)
  return jax.tree.map(lambda x: fn(x, 0 if np.ndim(x) else None), batch)
