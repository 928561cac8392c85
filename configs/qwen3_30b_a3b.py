"""Qwen3-30B-A3B, exactly the paper's model (30.5B parameters, 3.3B active per token).

Shapes only on a CPU: `python scripts/model_info.py --config=configs/qwen3_30b_a3b.py`
counts parameters with `jax.eval_shape` and allocates nothing. Training needs a TPU/GPU pod.
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(
      vocab_size=151_936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
      head_dim=128, num_experts=128, top_k=8, expert_ffn_dim=768, dense_ffn_dim=6144,
      moe_layers_skip=(), norm_topk_prob=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
      tie_embeddings=False, param_dtype="bfloat16", compute_dtype="bfloat16",
      load_balance_coef=0.001, router_z_coef=0.0)
  return config
