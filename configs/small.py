"""Small: a wider, deeper MoE for CPU experiments (minutes on a CPU).

  python scripts/model_info.py --config=configs/small.py
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(d_model=128, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=16,
                      num_experts=8, top_k=2, expert_ffn_dim=128, dense_ffn_dim=512)
  return config
