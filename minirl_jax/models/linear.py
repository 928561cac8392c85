"""Weight contractions: the one place that knows how a weight is stored.

Every matmul against a parameter goes through `einsum` and every per-expert weight gather
through `take`, so the sampler can swap in quantised weights without a second model.
"""
import dataclasses
from collections.abc import Sequence
from typing import Optional

import flax
import jax
import jax.numpy as jnp

INT8_MAX = 127.0


@dataclasses.dataclass(frozen=True)
class Format:
  """A symmetric quantisation grid: `storage` values in [-max, max] times a float32 scale.

  `activations` is how a contraction treats its other operand: "int8" or "fp8" quantise
  it per token onto the same kind of grid (W8A8), None leaves it in float (weight-only).
  """
  name: str
  storage: jnp.dtype
  max: float
  activations: Optional[str]


FORMATS = {f.name: f for f in (
    Format("int8", jnp.dtype(jnp.int8), INT8_MAX, "int8"),
    # e4m3 with no infinities: 448 is its largest finite value; a cast past it gives NaN.
    Format("fp8", jnp.dtype(jnp.float8_e4m3fn), 448.0, "fp8"),
    # int4 holds [-8, 7]; a symmetric grid uses [-7, 7].
    Format("int4", jnp.dtype(jnp.int4), 7.0, None),
)}
FORMATS_BY_STORAGE = {f.storage: f for f in FORMATS.values()}


@flax.struct.dataclass
class QuantizedWeight:
  """A weight stored on a quantised grid with float32 scales: w ~= values * scale.

  `scale` has the rank of `values`; each scale entry covers a block of
  `values.shape[i] // scale.shape[i]` consecutive entries on every axis i. Per output
  channel: size 1 on the contracted (input) axes, full size elsewhere. Grouped (int4): the
  innermost contracted axis is cut into groups. Leading axes (layers, experts) are never
  blocked, so slicing and gathering along them applies to both fields alike. The storage
  dtype of `values` names the format (`FORMATS`).
  """
  values: jax.Array  # int8, float8_e4m3fn or int4, the weight's shape
  scale: jax.Array   # float32, the weight's shape divided by the block shape

  @property
  def format(self) -> Format:
    return FORMATS_BY_STORAGE[jnp.dtype(self.values.dtype)]

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    scale = self.scale
    for axis, (n, s) in enumerate(zip(self.values.shape, scale.shape)):
      if 1 < s < n:  # a grouped axis: one scale per `n // s` consecutive entries
        scale = jnp.repeat(scale, n // s, axis=axis)
    return (self.values.astype(jnp.float32) * scale).astype(dtype)


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedWeight)


def quantize_values(x: jax.Array, axes: Sequence[int], fmt: str = "int8"):
  """Symmetric absmax quantisation of each slice over `axes` onto the grid of `fmt`.

  Returns:
    (values in the format's storage dtype, float32 scale with size 1 on `axes`): x ~=
    values * scale. An all-zero slice gets scale 1 and stays zero.
  """
  f = FORMATS[fmt]
  x32 = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x32), axis=tuple(axes), keepdims=True)
  scale = jnp.where(absmax > 0, absmax / f.max, 1.0)
  scaled = x32 / scale
  if jnp.issubdtype(f.storage, jnp.integer):
    scaled = jnp.round(scaled)
  # Float storage rounds to nearest in the cast; clipping first keeps e4m3 finite.
  return jnp.clip(scaled, -f.max, f.max).astype(f.storage), scale


def quantize_weight(w: jax.Array, contract_axes: Sequence[int], fmt: str = "int8",
                    group_size: Optional[int] = None) -> QuantizedWeight:
  """Symmetric quantisation of a weight onto `fmt`'s grid.

  Args:
    w: the float weight.
    contract_axes: its input (contracted) axes (`weights.contracted_axes`).
    fmt: a `FORMATS` name.
    group_size: None: one scale per output channel (index of the other axes). Else the
      innermost contracted axis is cut into groups of `min(group_size, its size)`
      consecutive entries, each with its own scale (the other contracted axes are not
      pooled: each of their indices gets its own scales).

  Raises:
    ValueError: `group_size` does not divide the grouped axis.
  """
  axes = tuple(sorted(contract_axes))
  if group_size is None or not axes:
    values, scale = quantize_values(w, axes, fmt)
    return QuantizedWeight(values=values, scale=scale)
  axis, n = axes[-1], w.shape[axes[-1]]
  group = min(group_size, n)
  if n % group:
    raise ValueError(f"group size {group_size} does not divide the contracted axis {axis} "
                     f"of size {n} of a weight of shape {w.shape}")
  # Axis `axis` -> (groups, group); pool over the group and the other contracted axes.
  w_grouped = w.reshape(w.shape[:axis] + (n // group, group) + w.shape[axis + 1:])
  pooled = axes[:-1] + (axis + 1,)
  values, scale = quantize_values(w_grouped, pooled, fmt)
  return QuantizedWeight(values=values.reshape(w.shape), scale=jnp.squeeze(scale, axis + 1))


def einsum(eqn: str, x: jax.Array, w) -> jax.Array:
  """`jnp.einsum(eqn, x, w)` computed in x's dtype; W8A8 or weight-only when `w` is a
  QuantizedWeight (by its format's `activations`)."""
  if not is_quantized(w):
    return jnp.einsum(eqn, x, w.astype(x.dtype))
  if w.format.activations is None:
    return jnp.einsum(eqn, x, w.dequantize(x.dtype))
  return _w8a8_einsum(eqn, x, w)


def _accumulator(fmt: Format):
  return jnp.int32 if jnp.issubdtype(fmt.storage, jnp.integer) else jnp.float32


def _w8a8_einsum(eqn, x, w):
  """8-bit x 8-bit contraction (int32 or float32 accumulation), rescaled by per-token and
  per-channel scales.

  Activations are quantised per token: one scale per index of x's non-contracted axes.
  """
  inputs, out = eqn.replace(" ", "").split("->")
  x_sub, w_sub = inputs.split(",")
  contracted = [c for c in w_sub if c in x_sub and c not in out]
  x_axes = tuple(x_sub.index(c) for c in contracted)
  w_axes = tuple(w_sub.index(c) for c in contracted)
  fmt = w.format
  x_values, x_scale = quantize_values(x, x_axes, fmt.activations)
  acc = jnp.einsum(eqn, x_values, w.values, preferred_element_type=_accumulator(fmt))
  x_keep = "".join(c for c in x_sub if c not in contracted)
  w_keep = "".join(c for c in w_sub if c not in contracted)
  scale = jnp.einsum(f"{x_keep},{w_keep}->{out}", jnp.squeeze(x_scale, x_axes),
                     jnp.squeeze(w.scale, w_axes))
  return (acc.astype(jnp.float32) * scale).astype(x.dtype)


def ragged_dot(x_MD: jax.Array, w, group_sizes_E: jax.Array, dot=jax.lax.ragged_dot
               ) -> jax.Array:
  """`dot(x, w[E, D, F], group_sizes)` in x's dtype; W8A8 or weight-only when quantised.

  `dot(lhs, rhs, group_sizes, preferred_element_type=...)` is the grouped matmul:
  `jax.lax.ragged_dot` or `megablox.gmm`.
  """
  if not is_quantized(w):
    return dot(x_MD, w.astype(x_MD.dtype), group_sizes_E)
  fmt = w.format
  if fmt.activations is None:
    return dot(x_MD, w.dequantize(x_MD.dtype), group_sizes_E)
  x_values, x_scale_M1 = quantize_values(x_MD, (1,), fmt.activations)
  acc_MF = dot(x_values, w.values, group_sizes_E, preferred_element_type=_accumulator(fmt))
  group_M = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(x_MD.shape[0]),
                             side="right")
  w_scale_MF = w.scale[jnp.minimum(group_M, w.scale.shape[0] - 1), 0]
  return (acc_MF.astype(jnp.float32) * x_scale_M1 * w_scale_MF).astype(x_MD.dtype)


def take(w, index: jax.Array):
  """Gathers rows of a weight along its leading (expert) axis."""
  if is_quantized(w):
    return QuantizedWeight(values=w.values[index], scale=w.scale[index])
  return w[index]
