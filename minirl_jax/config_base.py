"""The base experiment config: every key the code reads, with tiny-model defaults.

`configs/*.py` start from `get_base_config()` and override; scripts turn each section into
the frozen dataclass the library takes (e.g. `models.config.from_dict(config.model)`).
"""
import ml_collections


def model_section() -> ml_collections.ConfigDict:
  """The tiny default model: ~170k parameters, 2 MoE layers of 4 experts, top-2."""
  return ml_collections.ConfigDict(dict(
      vocab_size=32, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      num_experts=4, top_k=2, expert_ffn_dim=128, dense_ffn_dim=256, moe_layers_skip=(),
      norm_topk_prob=True, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_embeddings=False,
      param_dtype="float32", compute_dtype="float32", load_balance_coef=0.0,
      router_z_coef=0.0, moe_impl="blocks", moe_block_size=128, init_std=None))


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_section()
  return config
