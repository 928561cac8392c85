"""Orbax params checkpoints, alone or as a model directory (params + model_config.json)."""
import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from minirl_jax.models import config as config_lib

# A model directory (what scripts/convert_hf.py writes; `init_from` reads it).
PARAMS_DIR, MODEL_CONFIG = "params", "model_config.json"


def save_params(directory: str, params) -> None:
  """Writes a params pytree as an orbax checkpoint at `directory` (must not exist)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params)


def restore_params(directory: str, abstract_params: Optional[Any] = None):
  """Reads params written by `save_params`.

  Args:
    directory: the checkpoint directory.
    abstract_params: optional pytree of `jax.ShapeDtypeStruct` (with `.sharding` to restore
      straight onto a mesh, possibly of another shape than the one that saved it).
  """
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(directory), abstract_params)


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of a (possibly abstract) pytree, optionally with target shardings."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def save_model(directory: str, cfg: config_lib.ModelConfig, params) -> None:
  """Writes `directory/params` (see `save_params`) and `directory/model_config.json`."""
  os.makedirs(directory, exist_ok=True)
  save_params(os.path.join(directory, PARAMS_DIR), params)
  with open(os.path.join(directory, MODEL_CONFIG), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def read_model_config(directory: str) -> config_lib.ModelConfig:
  """The ModelConfig `save_model` wrote to `directory`."""
  with open(os.path.join(directory, MODEL_CONFIG), encoding="utf-8") as f:
    return config_lib.from_dict(json.load(f))
