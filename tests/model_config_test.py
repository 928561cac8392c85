"""ModelConfig validation and the config files."""
import importlib.util
import pathlib

import pytest

from minirl_jax.data import tokenizer
from minirl_jax.models import config as model_config
from minirl_jax.rl import settings
from minirl_jax.models.config import ModelConfig

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_heads=6, num_kv_heads=4), "model.num_heads"),
    (dict(top_k=5, num_experts=4), "model.top_k"),
    (dict(param_dtype="float16"), "model.param_dtype"),
    (dict(compute_dtype="int8"), "model.compute_dtype"),
    (dict(head_dim=15), "model.head_dim"),
    (dict(d_model=0), "model.d_model"),
    (dict(moe_layers_skip=(5,)), "model.moe_layers_skip"),
    (dict(moe_impl="megablocks"), "model.moe_impl"),
    (dict(rope_theta=-1.0), "model.rope_theta"),
    (dict(expert_capacity_factor=0.0), "model.expert_capacity_factor"),
    (dict(load_balance_coef=-0.1), "model.load_balance_coef"),
])
def test_invalid_fields_are_named(kwargs, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    ModelConfig(**kwargs)


def test_unknown_field_is_named():
  with pytest.raises(ValueError, match="hidden_size"):
    model_config.from_dict({"hidden_size": 8})


def test_segments_group_consecutive_layer_kinds():
  cfg = ModelConfig(num_layers=5, moe_layers_skip=(0, 3))
  assert cfg.segments() == [("dense", 0, 1), ("moe", 1, 3), ("dense", 3, 4), ("moe", 4, 5)]
  assert cfg.moe_layer_ids == (1, 2, 4)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_every_config_file_loads_and_validates(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert (module.__doc__ or "").strip(), f"{path.name} needs a docstring with its command"
  model_config.from_dict(config.model)
  settings.from_config(config, tokenizer.CharTokenizer())  # every section validates
