"""Orbax checkpoints: params-only directories (conversion, evaluation) and training state."""
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


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
