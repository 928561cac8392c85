"""The base experiment config: every key the code reads, with tiny-CPU defaults.

Each section is its frozen dataclass's fields at their defaults (`sections.to_config`): the
defaults live beside the code that reads them (`ModelConfig`, `SamplerConfig`,
`ObjectiveConfig`, `rl.settings.*`); this file states only where the tiny run differs.
`configs/*.py` start from `get_base_config()` and override; `minirl_jax.rl.settings` turns
each section back into its dataclass, validating it before anything compiles.
"""
import importlib.util
import os

import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags

from minirl_jax import objectives
from minirl_jax import sections
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import settings
from minirl_jax.sampling.config import SamplerConfig


def model_section() -> ml_collections.ConfigDict:
  """The tiny default model (`ModelConfig`'s defaults): ~226k parameters, 2 MoE layers of
  4 experts, top-2."""
  return sections.to_config(ModelConfig)


# Qwen3-30B-A3B exactly (Hugging Face config.json of Qwen/Qwen3-30B-A3B-Base).
QWEN3_30B_A3B = dict(
    vocab_size=151_936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
    head_dim=128, num_experts=128, top_k=8, expert_ffn_dim=768, dense_ffn_dim=6144,
    moe_layers_skip=(), norm_topk_prob=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_embeddings=False, param_dtype="bfloat16", compute_dtype="bfloat16",
    load_balance_coef=0.001, router_z_coef=0.0, remat=True)


def get_base_config() -> ml_collections.ConfigDict:
  """Every section at its dataclass's defaults, where the tiny CPU run differs stated here."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Start from converted weights (scripts/convert_hf.py --out=DIR) instead of a random init.
  config.init_from = config_dict.placeholder(str)
  config.model = model_section()
  config.mesh = sections.to_config(settings.MeshConfig)
  # The sampler's mesh when it has its own devices (rl.placement=disaggregated).
  config.sampler_mesh = sections.to_config(settings.MeshConfig)
  data = sections.to_config(settings.DataConfig, exclude=("task_options",))
  data.update(settings.TASK_KNOBS)  # data.num_operands, data.max_steps, ...: the tasks'
  config.data = data
  # eos_ids and pad_id come from the tokenizer. The tiny run samples with int8 weights.
  config.sampler = sections.to_config(SamplerConfig, exclude=("eos_ids", "pad_id"),
                                      dtype="int8", max_new_tokens=16, prompt_bucket=8)
  config.objective = sections.to_config(objectives.ObjectiveConfig, grad_cosine_every=10)
  config.rl = sections.to_config(settings.RLConfig)
  config.sft = sections.to_config(settings.SFTConfig)
  config.optim = sections.to_config(settings.OptimSection)
  config.checkpoint = sections.to_config(settings.CheckpointConfig)
  config.log = sections.to_config(settings.LogConfig)
  return config


def define_config_flag(script_file: str, default: str = "tiny", name: str = "config"):
  """`--config=configs/NAME.py` (plus `--config.section.field=value` overrides) for a
  script in `scripts/`; the default is found next to the script, whatever the cwd."""
  path = os.path.join(os.path.dirname(os.path.abspath(script_file)), os.pardir, "configs",
                      f"{default}.py")
  return config_flags.DEFINE_config_file(
      name, os.path.normpath(path),
      f"Experiment config file; override fields with --{name}.section.field=value.",
      lock_config=True)


def sibling(config_file: str, name: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of configs/NAME.py next to `config_file`: a config that builds on
  another (configs are files, not a package, so they are loaded by path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)
