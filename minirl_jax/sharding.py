"""The device mesh, logical-axis rules, and shardings for params, state and batches.

One mesh with axes (data, fsdp, expert, tensor) runs on 1 CPU device, 8 fake CPU devices, a
GPU host or a TPU pod. Logical names (`param_axes`) map to mesh axes through `RULES`; a
dimension that a mesh axis does not divide is replicated rather than failing, so tiny
configs run on any mesh.
"""
import math
from typing import Mapping, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (None: replicated).
RULES = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "expert": "expert",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "head_dim": None,
    "router": None,
}


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """Builds the mesh; one axis may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh has unknown axes {unknown}; known: {MESH_AXES}")
  sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if len(fill) > 1 or bad:
    raise ValueError(f"mesh sizes must be positive with at most one -1, got {sizes}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices do not divide by the fixed axes {sizes}")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"found {len(devices)}")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _axis_size(mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[n] for n in names)


def logical_spec(shape, names, mesh) -> P:
  """PartitionSpec for one array; mesh axes that do not divide a dim are dropped."""
  spec, used = [], set()
  for dim, name in zip(shape, names):
    axis = RULES.get(name) if name is not None else None
    axes = axis if isinstance(axis, tuple) else (axis,) if axis else ()
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and dim % _axis_size(mesh, axes) == 0:
      spec.append(axes if len(axes) > 1 else axes[0])
      used.update(axes)
    else:
      spec.append(None)
  return P(*spec)


def tree_shardings(abstract_tree, axes_tree, mesh):
  """NamedShardings for a pytree given a parallel pytree of logical axis-name tuples."""
  return jax.tree.map(lambda x, names: NamedSharding(mesh, logical_spec(x.shape, names, mesh)),
                      abstract_tree, axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple) and all(
                          isinstance(n, (str, type(None))) for n in x))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Shards one axis (the batch) over data x fsdp; the rest is replicated."""
  spec = [None] * ndim
  spec[batch_axis] = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  return NamedSharding(mesh, P(*spec))


def batch_size_multiple(mesh) -> int:
  """Global batch sizes must be a multiple of this to shard evenly."""
  return _axis_size(mesh, BATCH_AXES)


def shard_batch(tree, mesh, routing_key: Optional[str] = "routing"):
  """Places a host batch (dataclass or dict of arrays) on the mesh, batch-sharded.

  Leaves are [B, ...] except routing, which is [L, B, T, k]; scalars are replicated.
  """
  def place(path, x):
    if x is None:
      return None
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
      return jax.device_put(x, replicated(mesh))
    is_routing = routing_key and any(getattr(k, "name", getattr(k, "key", None)) == routing_key
                                     for k in path)
    return jax.device_put(x, batch_sharding(mesh, x.ndim, 1 if is_routing else 0))
  return jax.tree_util.tree_map_with_path(place, tree)
