"""Micro-batches: a batch's rows in n slices that run one after the other inside one jitted
step (`lax.scan` / `lax.map`), so activation memory follows the micro-batch, not the batch.

A TrainBatch keeps the GLOBAL counts of the (mini-)batch it came from, and every objective
divides by them, so the micro-batches' losses and gradients add up to the whole batch's: any
micro-batch size gives the same update (tests/rl_micro_test.py). Micro-batch j takes rows
j, j + n, j + 2n, ...: rows sharded over the data axis stay spread over every device.
"""
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax import metrics as metrics_lib


def split(batch, n: int):
  """Every array of `batch` with a leading micro-batch axis of size n (rows strided; arrays
  without rows, e.g. the global counts, repeated)."""
  def one(x, axis):
    if axis is None:
      return jnp.broadcast_to(x, (n, *jnp.shape(x)))
    rows = x.shape[axis]
    if rows % n:
      raise ValueError(f"{rows} rows do not split into {n} micro-batches")
    shape = (*x.shape[:axis], rows // n, n, *x.shape[axis + 1:])
    return jnp.moveaxis(x.reshape(shape), axis + 1, 0)
  return batch_lib.map_rows(one, batch)


def join(stacked, batch_axis: int = 0):
  """Inverse of `split` for an array [n, ..., rows / n, ...] whose rows are on
  `batch_axis` (of one micro-batch's array)."""
  x = jnp.moveaxis(stacked, 0, batch_axis + 1)
  return x.reshape(*x.shape[:batch_axis], -1, *x.shape[batch_axis + 2:])


def join_rows(stacked):
  """Inverse of `split` for a record of n micro-batches' outputs: each field's rows back on
  its declared batch axis (`batch.field`)."""
  return batch_lib.map_rows(lambda x, axis: x if axis is None else join(x, axis), stacked)


def map_batch(fn: Callable, batch, n: int):
  """`fn(micro_batch)` on each of n micro-batches, one after the other; outputs stacked on
  a leading axis (`join` restores rows). n = 1 calls `fn` once, unstacked."""
  if n == 1:
    return fn(batch)
  return jax.lax.map(fn, split(batch, n))


def value_and_grad(loss_fn: Callable, params, batch, n: int,
                   rules: Mapping[str, metrics_lib.Reduce]):
  """((loss, metrics), grads) of `loss_fn(params, micro_batch, weight) -> (loss, metrics)`
  summed over n micro-batches, gradients accumulated in a `lax.scan` (one micro-batch's
  activations alive at a time), each metric reduced by its declared rule in `rules`.
  `weight` = 1 / n scales terms that are per-forward means (the MoE aux loss) so they
  average instead of add."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:
    return grad_fn(params, batch, 1.0)

  def body(acc, micro_batch):
    (loss, metrics), grads = grad_fn(params, micro_batch, 1.0 / n)
    return jax.tree.map(jnp.add, acc, (loss, grads)), metrics

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), metrics = jax.lax.scan(body, zeros, split(batch, n))
  return (loss, metrics_lib.over_micro_batches(metrics, rules)), grads
