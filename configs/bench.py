"""Bench: the tiny Qwen3-MoE the inference and training benchmarks time, and the shape the
peer comparison (Tunix) was measured on: vocab 512, d 256, 4 layers, 8 query / 2 KV heads
of 32, 8 experts top-2 of width 512, float32.

  python scripts/bench_sampler.py        # decode tok/s and bandwidth fraction (default)
  python scripts/bench_train.py          # update-step FLOP/s against the GEMM peak
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(vocab_size=512, d_model=256, num_layers=4, num_heads=8, num_kv_heads=2,
                      head_dim=32, num_experts=8, top_k=2, expert_ffn_dim=512)
  return config
