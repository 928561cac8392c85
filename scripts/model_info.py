"""Prints a model's parameter table; last line is one JSON object.

  python scripts/model_info.py --config=configs/qwen3_30b_a3b.py
"""
import json


from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax.models import config as model_config
from minirl_jax.models import info

_CONFIG = config_base.define_config_flag(__file__)


def main(argv):
  del argv
  cfg = model_config.from_dict(_CONFIG.value.model)
  counts = info.param_counts(cfg)
  total = sum(counts.values())
  active = info.active_params(cfg, counts)
  print(f"{'component':<16}{'params':>18}{'share':>9}")
  for name, n in counts.items():
    print(f"{name:<16}{n:>18,}{n / total:>9.1%}")
  print(f"{'total':<16}{total:>18,}\n{'active/token':<16}{active:>18,}")
  print(json.dumps({"params_total": total, "params_active": active,
                    "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                    "num_layers": cfg.num_layers}))


if __name__ == "__main__":
  errors.run(main)
