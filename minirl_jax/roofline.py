"""Rooflines for the benchmarks: what a step must compute or read, and what the machine can.

Analytic counts from the config alone (`train_flops`, `decode_bytes`) divided by a measured
time give achieved FLOP/s and bytes/s; `gemm_peak` and `read_bandwidth` measure the ceilings
on the devices the script runs on, so a benchmark's ratios need no datasheet.
"""
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax.models.config import ModelConfig


def best_seconds(fn: Callable, repeats: int) -> float:
  """Best wall time of `repeats` calls of `fn` (blocked until ready), after one warm-up."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def active_matmul_params(cfg: ModelConfig) -> int:
  """Weights one token multiplies through: attention, router, its k experts (or the dense
  FFN) in every layer, and the lm head. The embedding lookup is a gather, not counted."""
  d = cfg.d_model
  attention = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  moe = d * cfg.num_experts + cfg.top_k * 3 * d * cfg.expert_ffn_dim
  dense = 3 * d * cfg.dense_ffn_dim
  return (cfg.num_layers * attention + cfg.num_moe_layers * moe
          + len(cfg.dense_layer_ids) * dense + d * cfg.vocab_size)


def train_flops(cfg: ModelConfig, rows: int, length: int) -> float:
  """FLOPs of one forward + backward over [rows, length] tokens: 6 x active params x tokens,
  plus causal attention's scores and weighted values (2 matmuls of 2 FLOPs per multiply,
  x3 for the backward, over the (length + 1) / 2 keys a query sees on average)."""
  tokens = rows * length
  attention = (cfg.num_layers * 2 * 2 * 3 * cfg.num_heads * cfg.head_dim
               * tokens * (length + 1) / 2)
  return 6.0 * active_matmul_params(cfg) * tokens + attention


def decode_bytes(params, cache) -> int:
  """Bytes one decode step must read at least: every weight except the embedding table (a
  step gathers only its rows) and the whole KV cache (keys and values)."""
  leaves = jax.tree.leaves({k: v for k, v in params.items() if k != "embed"})
  return sum(x.size * x.dtype.itemsize for x in leaves + jax.tree.leaves(cache))


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
  """Bytes/s the devices read at: the best of a sum and a matrix-vector product over a
  float32 array larger than a CPU's caches (each pass reads it once)."""
  rows = megabytes * 2 ** 20 // 4 // 1024
  x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, 1024), np.float32))
  v = jnp.ones((1024,), jnp.float32)
  passes = (jax.jit(jnp.sum), jax.jit(lambda x: x @ v))
  return max(x.nbytes / best_seconds(lambda f=f: f(x), repeats) for f in passes)


def gemm_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of an [n, n] x [n, n] matmul: the ceiling dense compute reaches here."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  matmul = jax.jit(lambda a: a @ a)
  return 2.0 * n ** 3 / best_seconds(lambda: matmul(a), repeats)


# Published dense bfloat16 peak FLOP/s and HBM bandwidth (bytes/s) of one chip, by the
# start of `jax.Device.device_kind` (vendor datasheets: NVIDIA H100 SXM and PCIe / H200 SXM /
# A100 SXM 80GB, Google Cloud TPU system architecture pages).
PUBLISHED = {
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100": (989e12, 3.35e12),
    "NVIDIA A100": (312e12, 2.039e12),
    "TPU v6 lite": (918e12, 1.64e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v5": (459e12, 2.765e12),
    "TPU v4": (275e12, 1.2e12),
}


def published_peaks(device_kind: str):
  """(bf16 FLOP/s, bytes/s) of one chip of this kind, or None where none is published
  here (a CPU: measure with `gemm_peak` and `read_bandwidth` instead)."""
  for prefix, peaks in PUBLISHED.items():
    if device_kind.startswith(prefix):
      return peaks
  return None
