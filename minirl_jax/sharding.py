"""The mesh (data, fsdp, expert, tensor), logical-axis rules, and the shardings of params,
optimizer state and batches: one code path from 1 CPU device to a pod (docs/sharding.md)."""
import functools
import math
from typing import Callable, Mapping

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minirl_jax import batch as batch_lib
from minirl_jax import errors

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# The expert axis splits the batch too: outside the MoE layers it is data parallelism, and
# inside them each device sends its tokens' assignments to the experts' owners.
BATCH_AXES = ("data", "fsdp", "expert")

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
  """Builds the mesh; one axis may be -1 (all remaining devices), absent axes are 1."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_sizes(axis_sizes, len(devices))
  # jax.make_mesh orders devices by the physical topology (TPU ICI rings). Auto axes: jit
  # propagates shardings from in/out_shardings (jax.make_mesh defaults to Explicit).
  try:
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
  except NotImplementedError as e:  # a TPU slice's physical axes cannot form these sizes
    raise errors.UserError(f"mesh {sizes} cannot be laid out on these {len(devices)} "
                           f"devices: {str(e).splitlines()[0]}") from None


def mesh_sizes(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Every axis's size on `num_devices` devices (the -1 filled in), or errors.UserError."""
  unknown = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown:
    raise errors.UserError(f"mesh has unknown axes {unknown}; known: {MESH_AXES}")
  sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if len(fill) > 1 or bad:
    raise errors.UserError(f"mesh sizes must be positive with at most one -1, got {sizes}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise errors.UserError(f"mesh: {num_devices} devices do not divide by the fixed axes "
                             f"{sizes}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise errors.UserError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                           f"found {num_devices}")
  return sizes


def _axis_size(mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[n] for n in names)


def logical_spec(shape, names, mesh) -> P:
  """PartitionSpec for one array from its logical axis names (`RULES`).

  Each name's mesh axes are taken in order while their product still divides the dim; an
  axis that would not divide it (or is used by another dim) is left out: that dim is
  replicated over it rather than failing, so tiny configs run on any mesh.
  """
  spec, used = [], set()
  for dim, name in zip(shape, names):
    axis = RULES.get(name) if name is not None else None
    kept = []
    for a in (axis if isinstance(axis, tuple) else (axis,) if axis else ()):
      if a not in used and mesh.shape[a] > 1 and dim % _axis_size(mesh, (*kept, a)) == 0:
        kept.append(a)
    used.update(kept)
    spec.append(tuple(kept) if len(kept) > 1 else kept[0] if kept else None)
  return P(*spec)


def tree_shardings(abstract_tree, axes_tree, mesh):
  """NamedShardings for a pytree given a parallel pytree of logical axis-name tuples."""
  return jax.tree.map(lambda x, names: NamedSharding(mesh, logical_spec(x.shape, names, mesh)),
                      abstract_tree, axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple) and all(
                          isinstance(n, (str, type(None))) for n in x))


def like_params(abstract_tree, abstract_params, param_shardings, mesh):
  """Shardings for a tree that holds copies of the params (optimizer moments).

  A leaf whose key path ends with a parameter's key path and has its shape takes that
  parameter's sharding (matched by path, never by shape alone: w_gate and w_down can share
  a shape but not a sharding); every other leaf (counts, flags) is replicated.
  """
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  by_path = {tuple(path): (x.shape, sh)
             for (path, x), sh in zip(flat, jax.tree.leaves(param_shardings))}
  longest = max((len(p) for p in by_path), default=0)

  def pick(path, x):
    for n in range(min(len(path), longest), 0, -1):
      shape, sh = by_path.get(tuple(path[-n:]), (None, None))
      if shape == x.shape:
        return sh
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def on_mesh(mesh, fn: Callable) -> Callable:
  """`fn` traced and run under `jax.set_mesh(mesh)`: how the MoE layer finds the expert
  axis to split its experts over (`models.expert_parallel`)."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Shards one axis (the batch) over data x fsdp x expert; the rest is replicated."""
  spec = [None] * ndim
  spec[batch_axis] = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  return NamedSharding(mesh, P(*spec))


def batch_size_multiple(mesh) -> int:
  """Global batch sizes must be a multiple of this to shard evenly."""
  return _axis_size(mesh, BATCH_AXES)


def shard_batch(batch, mesh):
  """Places a batch on the mesh, its rows sharded over `BATCH_AXES`, scalars replicated.

  Rows are found by `batch.map_rows`: a record's declared axes, else axis 0. Host (numpy)
  arrays are this process's rows of the global batch (what the per-process grain pipelines
  yield); `jax.Array`s are already global and are only resharded.
  """
  def place(x, batch_axis):
    sh = (replicated(mesh) if batch_axis is None
          else batch_sharding(mesh, np.ndim(x), batch_axis))
    if isinstance(x, jax.Array):
      return jax.device_put(x, sh)
    return jax.make_array_from_process_local_data(sh, np.asarray(x))
  return batch_lib.map_rows(place, batch)
