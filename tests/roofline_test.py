"""The benchmarks' analytic counts (minirl_jax/roofline.py) against hand-computed values."""
import jax
import jax.numpy as jnp
import pytest

from minirl_jax import roofline
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig


def test_active_params_count_k_experts_and_the_head_not_the_embedding():
  cfg = ModelConfig(vocab_size=32, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=16, num_experts=4, top_k=2, expert_ffn_dim=128, dense_ffn_dim=256,
                    moe_layers_skip=(1,))
  attention = 64 * 16 * (4 + 2 + 2) + 4 * 16 * 64   # q, k, v in; o out
  moe = 64 * 4 + 2 * 3 * 64 * 128                    # router + 2 of the 4 experts
  dense = 3 * 64 * 256
  assert roofline.active_matmul_params(cfg) == 3 * attention + 2 * moe + dense + 64 * 32


def test_train_flops_are_six_per_param_and_token_plus_causal_attention():
  cfg = ModelConfig()
  rows, length = 2, 7
  attention = cfg.num_layers * 12 * cfg.num_heads * cfg.head_dim * rows * length * 4  # 4 keys
  assert roofline.train_flops(cfg, rows, length) == pytest.approx(
      6 * roofline.active_matmul_params(cfg) * rows * length + attention)


def test_decode_bytes_are_the_weights_but_the_embedding_and_the_whole_cache():
  cfg = ModelConfig()
  params = transformer.init_params(cfg, jax.random.key(0))
  cache = transformer.init_kv_cache(cfg, batch=3, length=10)
  weights = sum(x.size * 4 for k, v in params.items() if k != "embed"
                for x in jax.tree.leaves(v))
  kv = 2 * cfg.num_layers * 3 * 10 * cfg.num_kv_heads * cfg.head_dim * 4 + 3 * 10 + 4
  assert roofline.decode_bytes(params, cache) == weights + kv
  assert roofline.decode_bytes({"embed": jnp.zeros((1000, 8))}, cache) == kv


def test_published_peaks_by_device_kind():
  assert roofline.published_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
  assert roofline.published_peaks("NVIDIA H100 PCIe") == (756e12, 2.0e12)
  assert roofline.published_peaks("NVIDIA H200") == (989e12, 4.8e12)
  assert roofline.published_peaks("TPU v5p") == (459e12, 2.765e12)
  assert roofline.published_peaks("TPU v5 lite") == (197e12, 0.819e12)
  assert roofline.published_peaks("cpu") is None
