"""The TPU grouped matmul behind `moe_impl="megablox"`: the Pallas kernel that ships with JAX
(`jax.experimental.pallas.ops.tpu.megablox`), with its gradient kernels (gmm, tgmm).

What runs depends on the platform the program is lowered for (`jax.lax.platform_dependent`),
so one traced program serves all three:
- tpu: the Pallas kernel, compiled by Mosaic;
- cpu: the same kernel in Pallas interpret mode (slow; it exists so the tests check the
  kernel's values and gradients on any machine);
- anything else (GPU): `jax.lax.ragged_dot`, the platform's own grouped matmul.

The kernel takes float32 or bfloat16 operands. int8 operands go to `jax.lax.ragged_dot`,
which takes them as they are. fp8 (e4m3) grids hold only values that bfloat16 represents
exactly, and their products and float32 sums are exact well past any layer width here, so
the W8A8 sampler runs them as bfloat16 with float32 accumulation.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops

KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Columns per tile of the contracted and output dims (a multiple of the TPU's 128 lanes).
MAX_TILE = 512


def tiling(rows: int, k: int, n: int, block_rows: int) -> tuple[int, int, int]:
  """(rows, contracted, output) per tile of one kernel call.

  Mosaic needs a tile's last two dims to be multiples of (8 sublanes, 128 lanes) or whole,
  and the gradient kernels tile the transposed rows and swap k and n, so the same rule
  must hold for every call the custom VJP makes (it passes this function on, and each
  call applies it to its own dims): a call of at most `block_rows` rows (rounded up to 8)
  is one tile of them; a larger one tiles by `block_rows` rounded up to 128; k and n are
  whole up to `MAX_TILE`.
  """
  rows8 = -(-rows // 8) * 8
  tm = rows8 if rows8 <= block_rows else -(-block_rows // 128) * 128
  return tm, min(k, MAX_TILE), min(n, MAX_TILE)


def gmm(lhs_MK: jax.Array, rhs_EKN: jax.Array, group_sizes_E: jax.Array,
        preferred_element_type=None, *, block_rows: int = 128) -> jax.Array:
  """`jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=...)` by the
  megablox kernel: rows [sum(group_sizes[:e]), +group_sizes[e]) of `lhs` times `rhs[e]`.

  Rows past the last group come back zero. `block_rows` bounds the kernel's rows per tile.
  """
  out_dtype = jnp.dtype(preferred_element_type or lhs_MK.dtype)
  if lhs_MK.dtype == rhs_EKN.dtype == jnp.int8:
    # The kernel takes float operands, so int8 ones would be widened to bfloat16 at every
    # call (17% of the 30B v5p decode step, scripts/compile.py); XLA's grouped matmul takes
    # int8 as it is, with the same exact integer sums.
    return jax.lax.ragged_dot(lhs_MK, rhs_EKN, group_sizes_E,
                              preferred_element_type=out_dtype)
  if lhs_MK.dtype not in KERNEL_DTYPES or rhs_EKN.dtype not in KERNEL_DTYPES:
    lhs_MK, rhs_EKN = lhs_MK.astype(jnp.bfloat16), rhs_EKN.astype(jnp.bfloat16)
  m, k = lhs_MK.shape
  tiles = functools.partial(tiling, block_rows=block_rows)
  lhs_MK = jnp.pad(lhs_MK, ((0, -m % tiles(m, k, rhs_EKN.shape[2])[0]), (0, 0)))
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  # The kernel leaves rows past the last group unwritten (NaN in interpret mode), in its
  # output and in the lhs gradient it computes with itself: both are selected away.
  grouped_M = jnp.arange(lhs_MK.shape[0]) < jnp.sum(group_sizes_E)
  lhs_MK = jnp.where(grouped_M[:, None], lhs_MK, jax.lax.stop_gradient(lhs_MK))

  # The kernel accumulates in float32 and rounds once to its output's dtype, as ragged_dot's
  # float32 result cast would: writing `out_dtype` directly moves half the bytes for bf16.
  kernel_out = out_dtype if out_dtype in KERNEL_DTYPES else jnp.float32

  def kernel(interpret):
    return lambda x, w, g: megablox_ops.gmm(x, w, g, kernel_out, tiles, None, None, False,
                                            interpret)

  def ragged(x, w, g):
    return jax.lax.ragged_dot(x, w, g, preferred_element_type=jnp.float32).astype(kernel_out)

  out = jax.lax.platform_dependent(lhs_MK, rhs_EKN, group_sizes_E, tpu=kernel(False),
                                   cpu=kernel(True), default=ragged)
  return jnp.where(grouped_M[:, None], out, 0)[:m].astype(out_dtype)
