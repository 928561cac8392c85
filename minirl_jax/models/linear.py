"""Weight contractions: the one place that knows how a weight is stored.

Every matmul against a parameter goes through `einsum` and every per-expert weight gather
through `take`, so the sampler can swap in quantised weights without a second model.
"""
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp

INT8_MAX = 127.0


@flax.struct.dataclass
class QuantizedWeight:
  """A weight stored as int8 with one float32 scale per output channel: w ~= values * scale.

  `scale` has the rank of `values`, with size 1 on the contracted (input) axes, so slicing
  and gathering along any leading axis (layers, experts) applies to both fields alike.
  """
  values: jax.Array  # int8, the weight's shape
  scale: jax.Array   # float32, the weight's shape with 1 on the contracted axes

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedWeight)


def _symmetric_int8(x, axes):
  """Per-slice symmetric int8: `axes` are reduced for the absmax (kept as size 1)."""
  x32 = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)  # all-zero slices stay zero
  values = jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return values, scale


def quantize_weight(w: jax.Array, contract_axes: Sequence[int]) -> QuantizedWeight:
  """Symmetric per-output-channel int8: one scale per index of the non-contracted axes."""
  values, scale = _symmetric_int8(w, tuple(contract_axes))
  return QuantizedWeight(values=values, scale=scale)


def einsum(eqn: str, x: jax.Array, w) -> jax.Array:
  """`jnp.einsum(eqn, x, w)` computed in x's dtype; W8A8 when `w` is a QuantizedWeight."""
  if is_quantized(w):
    return _w8a8_einsum(eqn, x, w)
  return jnp.einsum(eqn, x, w.astype(x.dtype))


def _w8a8_einsum(eqn, x, w):
  """int8 x int8 -> int32 contraction, rescaled by per-token and per-channel scales.

  Activations are quantised per token: one scale per index of x's non-contracted axes.
  """
  inputs, out = eqn.replace(" ", "").split("->")
  x_sub, w_sub = inputs.split(",")
  contracted = [c for c in w_sub if c in x_sub and c not in out]
  x_axes = tuple(x_sub.index(c) for c in contracted)
  w_axes = tuple(w_sub.index(c) for c in contracted)
  x_values, x_scale = _symmetric_int8(x, x_axes)
  acc = jnp.einsum(eqn, x_values, w.values, preferred_element_type=jnp.int32)
  x_keep = "".join(c for c in x_sub if c not in contracted)
  w_keep = "".join(c for c in w_sub if c not in contracted)
  scale = jnp.einsum(f"{x_keep},{w_keep}->{out}", jnp.squeeze(x_scale, x_axes),
                     jnp.squeeze(w.scale, w_axes))
  return (acc.astype(jnp.float32) * scale).astype(x.dtype)


def ragged_dot(x_MD: jax.Array, w, group_sizes_E: jax.Array) -> jax.Array:
  """`jax.lax.ragged_dot(x, w[E, D, F], group_sizes)` in x's dtype; W8A8 when quantised."""
  if not is_quantized(w):
    return jax.lax.ragged_dot(x_MD, w.astype(x_MD.dtype), group_sizes_E)
  x_values, x_scale_M1 = _symmetric_int8(x_MD, (1,))
  acc_MF = jax.lax.ragged_dot(x_values, w.values, group_sizes_E,
                              preferred_element_type=jnp.int32)
  group_M = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(x_MD.shape[0]),
                             side="right")
  w_scale_MF = w.scale[jnp.minimum(group_M, w.scale.shape[0] - 1), 0]
  return (acc_MF.astype(jnp.float32) * x_scale_M1 * w_scale_MF).astype(x_MD.dtype)


def take(w, index: jax.Array):
  """Gathers rows of a weight along its leading (expert) axis."""
  if is_quantized(w):
    return QuantizedWeight(values=w.values[index], scale=w.scale[index])
  return w[index]
