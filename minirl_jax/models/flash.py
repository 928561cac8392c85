"""The TPU attention kernel behind `model.attention_impl="flash"`: the Pallas flash attention
that ships with JAX (`jax.experimental.pallas.ops.tpu.flash_attention`), causal, with padding
as segment ids, and its backward kernels.

Why: XLA compiles `layers.attend` to matmuls whose float32 scores go through HBM, a query
chunk at a time, and computes the masked half of causal attention too; at the 30B preset's
33,792 tokens that traffic was 67% of the update's estimated time on a v5p
(`scripts/compile.py`, docs/scaling.md). The kernel keeps a block of scores on chip and skips
the blocks above the diagonal.

Where it runs: self-attention over whole sequences (updates, pi_old, the SFT step) in programs
lowered for TPU; elsewhere (CPU, GPU) and in the sampler's cached attention, `layers.attend`.
At every real token the two agree (a pad query attends to the pads before it instead of to
the real tokens; no real token reads a pad's output): tests/flash_test.py checks outputs and
gradients against `layers.attend` in Pallas's TPU interpret mode.
"""
import functools
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import PartitionSpec as P

from minirl_jax import sharding
from minirl_jax.models import layers

LANES = 128  # a block's rows and columns are whole multiples of the TPU's lanes
SCOPE = "flash_block_"


def block_size(length: int, chunk: int) -> int:
  """Queries (and keys) per kernel block: `model.attention_chunk` rounded up to whole lanes,
  at most the (lane-rounded) sequence."""
  return LANES * math.ceil(min(chunk or length, length) / LANES)


def kernel_attend(q_BTHK, k_BTGK, v_BTGK, valid_BT, block: int):
  """Causal attention of each real token to the real tokens up to it, by the Pallas kernel
  (traced for TPU or inside `pltpu.force_tpu_interpret_mode()`)."""
  b, t, h, d = q_BTHK.shape
  groups = h // k_BTGK.shape[2]
  pad = -t % block
  to_heads = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  # Grouped queries: each kv head serves `groups` query heads, h = g * groups + i.
  q_BHTK = to_heads(q_BTHK)
  k_BHTK = to_heads(jnp.repeat(k_BTGK, groups, axis=2))
  v_BHTK = to_heads(jnp.repeat(v_BTGK, groups, axis=2))
  segments = jnp.pad(valid_BT, ((0, 0), (0, pad))).astype(jnp.int32)
  sizes = pallas_flash.BlockSizes(
      block_q=block, block_k_major=block, block_k=block, block_b=1,
      block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
      block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
  with jax.named_scope(f"{SCOPE}{block}"):  # the compiled kernels' names carry the block
    out_BHTK = pallas_flash.flash_attention(
        q_BHTK, k_BHTK, v_BHTK, segment_ids=pallas_flash.SegmentIds(segments, segments),
        causal=True, sm_scale=d ** -0.5, block_sizes=sizes)
  return out_BHTK.transpose(0, 2, 1, 3)[:, :t]


def kernel_flops(op_name: str, operand_dims: list[list[int]]) -> Optional[float]:
  """FLOPs of one compiled call of the kernels `kernel_attend` runs (None for any other
  kernel), by what they compute: every pair of query and key blocks on or below the
  diagonal (the kernel skips the rest), 2 matmuls per pair in the forward, 4 in the dkv
  backward kernel and 3 in the dq one (each recomputes the scores). The forward's own cost
  estimate counts every pair, the masked ones too."""
  scope = re.search(rf"/{SCOPE}(\d+)/", op_name)
  heads = [dims for dims in operand_dims if len(dims) == 4]
  if not scope or not heads:
    return None
  block, (b, h, t, d) = int(scope.group(1)), heads[0]
  matmuls = 4 if "bwd_dkv" in op_name else 3 if "bwd_dq" in op_name else 2
  n = -(-t // block)
  return b * h * n * (n + 1) / 2 * matmuls * 2 * block * block * d


def self_attend(q_BTHK, k_BTGK, v_BTGK, valid_BT, chunk: int):
  """Causal self-attention over whole sequences: the kernel on TPU (per device, under
  `shard_map`: Mosaic kernels are not partitioned by XLA), `layers.attend` elsewhere."""
  t = q_BTHK.shape[1]
  kernel = functools.partial(kernel_attend, block=block_size(t, chunk))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    kernel = _per_device(kernel, q_BTHK.shape, k_BTGK.shape, mesh)
  xla = lambda q, k, v, valid: layers.attend(q, k, v, valid, jnp.arange(t), chunk=chunk)
  return jax.lax.platform_dependent(q_BTHK, k_BTGK, v_BTGK, valid_BT, tpu=kernel,
                                    default=xla)


def _per_device(kernel, q_shape, k_shape, mesh):
  """`kernel` under shard_map: rows split as the batch is, heads as `tensor` splits them."""
  rows = sharding.logical_spec(q_shape[:1], ("batch",), mesh)[0]
  tensor = mesh.shape.get("tensor", 1)
  splits = tensor > 1 and q_shape[2] % tensor == 0 and k_shape[2] % tensor == 0
  heads = "tensor" if splits else None
  qkv = P(rows, None, heads, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)),
                       out_specs=qkv, check_vma=False)
