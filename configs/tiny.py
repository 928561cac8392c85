"""Tiny: the embedded default, for tests and demos (seconds on a CPU).

  python scripts/model_info.py --config=configs/tiny.py
"""
from minirl_jax import config_base


def get_config():
  return config_base.get_base_config()
