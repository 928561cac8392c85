"""Hugging Face Qwen3-MoE checkpoint files: streaming safetensors import, export, conversion.

Import reads `config.json` + `*.safetensors` (one file or sharded with an index) tensor by
tensor into preallocated per-leaf buffers, or straight into sharded arrays on a mesh.
Experts may be stored per expert (transformers 4.x, vLLM) or fused (`experts.gate_up_proj`,
transformers 5.x in memory); export always writes the per-expert layout, which both read.
The tensor layout itself is `minirl_jax.models.hf_config`.
"""
import glob
import json
import os
import shutil
from typing import Any, Optional

from absl import logging
import flax
import jax
import numpy as np

from minirl_jax.rl import checkpointing
from minirl_jax import errors
from minirl_jax.models import hf_config
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# The original config.json, kept beside a model directory so export restores its token ids.
HF_CONFIG = "hf_config.json"


def _safetensors():
  """The optional `safetensors` package (extra "hf"), imported when a file is touched."""
  try:
    import safetensors
    import safetensors.numpy
  except ImportError as e:
    raise ImportError("reading or writing Hugging Face checkpoints needs safetensors: "
                      'pip install -e ".[hf]"') from e
  return safetensors


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class _Reader:
  """Open safetensors files of one checkpoint directory; reads one tensor at a time."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      weight_map = _read_json(index)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p)
                     for p in glob.glob(os.path.join(directory, "*.safetensors")))
      weight_map = None
    if not files:
      raise errors.MissingPath(f"no *.safetensors files in {directory}")
    safe_open = _safetensors().safe_open
    self._handles = {f: safe_open(os.path.join(directory, f), framework="np") for f in files}
    self.files = {}
    for f, handle in self._handles.items():
      for name in handle.keys():
        if name in self.files:
          raise errors.UserError(f"{directory}: tensor {name} is in both {self.files[name]} "
                                 f"and {f}")
        self.files[name] = f
    if weight_map is not None:
      lost = sorted(n for n, f in weight_map.items() if self.files.get(n) != f)
      if lost:
        raise errors.UserError(f"{INDEX_FILE} lists tensors its files lack, e.g. {lost[:5]}")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._handles[self.files[name]].get_tensor(name)


def _region(index, shape):
  """Normalises a tuple of slices (from `make_array_from_callback`) to (start, stop) pairs."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  bounds = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {index} is not supported")
    bounds.append((start, stop))
  return tuple(bounds)


def _read_region(reader, pieces, bounds, dtype):
  """The part `bounds` of one leaf, assembled from the tensors that overlap it."""
  out = np.empty([stop - start for start, stop in bounds], dtype)
  for piece in pieces:
    lead, rest = bounds[:len(piece.at)], bounds[len(piece.at):]
    if not all(start <= a < stop for (start, stop), a in zip(lead, piece.at)):
      continue
    value = piece.to_leaf(reader.get(piece.name))
    out[tuple(a - start for (start, _), a in zip(lead, piece.at))] = (
        value[tuple(slice(start, stop) for start, stop in rest)])
  return out


def _load_leaf(reader, pieces, shape, dtype, sharding):
  """One params leaf as a jax.Array placed by `sharding`, read shard by shard."""
  cache = {}  # replicated shards are read once

  def callback(index):
    bounds = _region(index, shape)
    if bounds not in cache:
      cache[bounds] = _read_region(reader, pieces, bounds, dtype)
    return cache[bounds]

  return jax.make_array_from_callback(shape, sharding, callback)


def _placement(shardings, shapes):
  """{leaf path: Sharding}; default: this process's first device."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return {path: device for path in shapes}
  flat = flax.traverse_util.flatten_dict(shardings)
  if flat.keys() != shapes.keys():
    raise ValueError(f"shardings do not match the params: leaves "
                     f"{sorted('/'.join(p) for p in flat.keys() ^ shapes.keys())}")
  return flat


def load_hf(directory: str, *, dtype: Optional[str] = None, shardings: Any = None,
            **overrides) -> tuple[ModelConfig, Any]:
  """Reads a Hugging Face Qwen3-MoE checkpoint directory.

  Each params leaf is filled tensor by tensor from the memory-mapped safetensors files,
  placed on device, and its host buffer dropped before the next leaf: host memory peaks at
  one leaf (one shard of it when `shardings` splits it), never a second copy of the model.

  Args:
    directory: holds `config.json` and `*.safetensors` (optionally sharded with
      `model.safetensors.index.json`).
    dtype: parameter dtype ("float32" or "bfloat16"); default: the checkpoint's own
      (`dtype`/`torch_dtype` in config.json) when it is one of those, else float32.
    shardings: a pytree of `jax.sharding.Sharding` matching the params, or a function
      `ModelConfig -> that pytree`; each device then reads only its own shard. Default:
      the first device.
    **overrides: ModelConfig fields that config.json does not describe.

  Returns:
    (ModelConfig, params).

  Raises:
    ValueError: unsupported config, or missing / unexpected / mis-shaped tensors (named).
  """
  if dtype is not None:
    overrides["param_dtype"] = dtype
  cfg = hf_config.config_from_hf(_read_json(os.path.join(directory, "config.json")),
                                 **overrides)
  reader = _Reader(directory)
  try:
    pieces = hf_config.layout(cfg, hf_config.fused_layers(cfg, reader.files))
    hf_config.check_tensors({n: reader.shape(n) for n in reader.files}, pieces, cfg)
  except ValueError as e:
    raise errors.UserError(f"{directory}: {e}") from e
  shapes = hf_config.leaf_shapes(cfg)
  placement = _placement(shardings(cfg) if callable(shardings) else shardings, shapes)
  np_dtype = np.dtype(cfg.weight_dtype)
  params = {}
  for path, shape in shapes.items():
    leaf_pieces = [p for p in pieces if p.leaf == path]
    params[path] = _load_leaf(reader, leaf_pieces, shape, np_dtype, placement[path])
  logging.info("loaded %s: %d tensors, %d layers, %s", directory, len(pieces),
               cfg.num_layers, cfg.param_dtype)
  return cfg, flax.traverse_util.unflatten_dict(params)


def _plan_shards(pieces, itemsize, max_shard_bytes):
  """Groups pieces into consecutive files of at most `max_shard_bytes` (one tensor may exceed)."""
  shards, size = [[]], 0
  for piece in pieces:
    nbytes = int(np.prod(piece.hf_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(piece)
    size += nbytes
  return shards


class _HostSlices:
  """Host copies of `params[leaf][layer]` for the few layers being written."""

  def __init__(self, flat, capacity=16):
    self._flat, self._cache, self._capacity = flat, {}, capacity

  def get(self, piece: hf_config.Piece) -> np.ndarray:
    if not piece.at:
      return np.asarray(self._flat[piece.leaf])
    key = (piece.leaf, piece.at[0])
    if key not in self._cache:
      if len(self._cache) >= self._capacity:
        self._cache.pop(next(iter(self._cache)))  # the oldest
      self._cache[key] = np.asarray(self._flat[piece.leaf][piece.at[0]])
    return self._cache[key][piece.at[1:]]


def _check_params(flat, cfg):
  want = hf_config.leaf_shapes(cfg)
  got = {path: tuple(x.shape) for path, x in flat.items()}
  if got != want:
    bad = sorted(p for p in set(want) | set(got) if want.get(p) != got.get(p))
    raise errors.UserError("params do not match the config at " + ", ".join(
        f"{'/'.join(p)} (config {want.get(p)}, params {got.get(p)})" for p in bad))


def save_hf(directory: str, cfg: ModelConfig, params, *, base_config: Optional[dict] = None,
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes params as a Hugging Face Qwen3-MoE checkpoint (per-expert tensor layout).

  Host memory holds one output file's tensors at a time.

  Args:
    directory: created if needed, without safetensors files; gets `config.json` and
      `model.safetensors`, or
      `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when the tensors
      exceed `max_shard_bytes`.
    cfg: the model.
    params: the params pytree (fully addressable from this process).
    base_config: an original `config.json` whose non-architecture fields are kept.
    max_shard_bytes: size bound of one safetensors file.
  """
  flat = flax.traverse_util.flatten_dict(params)
  _check_params(flat, cfg)
  host = _HostSlices(flat)
  itemsize = np.dtype(cfg.weight_dtype).itemsize
  shards = _plan_shards(hf_config.layout(cfg), itemsize, max_shard_bytes)
  os.makedirs(directory, exist_ok=True)
  stale = glob.glob(os.path.join(directory, "*.safetensors"))
  if stale:  # a reader would mix them with the new files
    raise FileExistsError(f"{directory} already holds safetensors files, e.g. {stale[0]}")
  weight_map, total = {}, 0
  for n, shard in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1
             else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors")
    tensors = {}
    for piece in shard:
      value = host.get(piece).astype(cfg.weight_dtype)
      tensors[piece.name] = np.ascontiguousarray(piece.from_leaf(value))
      weight_map[piece.name] = fname
      total += tensors[piece.name].nbytes
    _safetensors().numpy.save_file(tensors, os.path.join(directory, fname),
                                   metadata={"format": "pt"})
  if len(shards) > 1:
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config.config_to_hf(cfg, base_config), f, indent=2, sort_keys=True)
  logging.info("wrote %s: %d tensors, %.2f GiB in %d file(s)", directory, len(weight_map),
               total / 2**30, len(shards))


def hf_to_orbax(hf_dir: str, out_dir: str, *, dtype: Optional[str] = None,
                shardings: Any = None) -> ModelConfig:
  """Converts a Hugging Face checkpoint to `out_dir/{params, model_config.json, hf_config.json}`.

  `params` and `model_config.json` are a model directory (`checkpointing.save_model`: read with
  `checkpointing.restore_params` and `checkpointing.read_model_config`); `hf_config.json` is the
  original config.json, kept so `orbax_to_hf` can restore token ids and other fields the
  model does not use. `dtype` and `shardings` are as in `load_hf`.
  """
  cfg, params = load_hf(hf_dir, dtype=dtype, shardings=shardings)
  checkpointing.save_model(out_dir, cfg, params)
  shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, HF_CONFIG))
  return cfg


def orbax_to_hf(orbax_dir: str, hf_dir: str, *, params_dir: Optional[str] = None,
                max_shard_bytes: int = 5 * 2**30) -> ModelConfig:
  """Exports `orbax_dir` (as written by `hf_to_orbax`) to a Hugging Face directory.

  Args:
    orbax_dir: holds `model_config.json` (and optionally `hf_config.json`).
    hf_dir: output directory.
    params_dir: the orbax params to export (e.g. a trained checkpoint's params); default
      `orbax_dir/params`.
    max_shard_bytes: size bound of one safetensors file.
  """
  cfg = checkpointing.read_model_config(orbax_dir, field="orbax_dir")
  base_path = os.path.join(orbax_dir, HF_CONFIG)
  base = _read_json(base_path) if os.path.exists(base_path) else None
  params = checkpointing.restore_params(
      params_dir or os.path.join(orbax_dir, checkpointing.PARAMS_DIR))
  save_hf(hf_dir, cfg, params, base_config=base, max_shard_bytes=max_shard_bytes)
  return cfg


def hf_logits(directory: str, input_ids_BT: np.ndarray,
              attn_mask_BT: Optional[np.ndarray] = None, *, dtype: Optional[str] = None,
              compute_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
  """minirl_jax's logits and routing for a Hugging Face checkpoint (conversion check).

  Positions count real tokens only (left padding shifts nothing), as transformers'
  `generate` does; a transformers reference must pass the same `position_ids`
  (`max(cumsum(mask) - 1, 0)`), since its forward defaults to `arange(T)`.

  Args:
    directory: the Hugging Face checkpoint.
    input_ids_BT: int token ids.
    attn_mask_BT: 1 on real tokens, 0 on (left) padding; default all ones.
    dtype: parameter dtype (see `load_hf`).
    compute_dtype: matmul dtype of the forward.

  Returns:
    (logits_BTV float32, routing_LBTk int32 experts of the L MoE layers, best first).
  """
  cfg, params = load_hf(directory, dtype=dtype, compute_dtype=compute_dtype)
  mask = None if attn_mask_BT is None else np.asarray(attn_mask_BT).astype(bool)
  fwd = jax.jit(lambda p, t, m: transformer.forward(p, t, cfg=cfg, attn_mask_BT=m))
  with jax.default_matmul_precision("highest"):  # full float32 matmuls on TPU/GPU too
    logits_BTV, aux = fwd(params, np.asarray(input_ids_BT, np.int32), mask)
  return np.asarray(logits_BTV, np.float32), np.asarray(aux.routing, np.int32)
