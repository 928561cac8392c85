"""Qwen3-30B-A3B, exactly the paper's model (30.5B parameters, 3.3B active per token).

Shapes only on a CPU: `python scripts/model_info.py --config=configs/qwen3_30b_a3b.py`
counts parameters with `jax.eval_shape` and allocates nothing. Training needs a TPU/GPU pod.
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(config_base.QWEN3_30B_A3B)
  return config
