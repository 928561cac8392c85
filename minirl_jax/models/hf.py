"""Hugging Face Qwen3-MoE checkpoints: config translation, streaming import, export.

Import reads `config.json` + `*.safetensors` (one file or sharded with an index) tensor by
tensor into preallocated per-leaf buffers, or straight into sharded arrays on a mesh.
Experts may be stored per expert (transformers 4.x, vLLM) or fused (`experts.gate_up_proj`,
transformers 5.x in memory); export always writes the per-expert layout, which both read.
"""
import dataclasses
import glob
import json
import os
import shutil
from typing import Any, Callable, Optional

import flax
import jax
import numpy as np

from minirl_jax import checkpoint
from minirl_jax.models import config as config_lib
from minirl_jax.models.config import ModelConfig
from minirl_jax.models import transformer

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "moe_intermediate_size", "num_experts_per_tok")


def _safetensors():
  """The optional `safetensors` package (extra "hf"), imported when a file is touched."""
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading or writing Hugging Face checkpoints needs safetensors: "
                      'pip install -e ".[hf]"') from e
  return safetensors


def _reject(message):
  raise ValueError(f"Unsupported Hugging Face config: {message}")


def _rope_theta(hf: dict) -> float:
  """rope_theta from a 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) config."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for source in (params, scaling):
    kind = source.get("rope_type", source.get("type", "default"))
    if kind != "default":
      _reject(f"rope_type {kind!r} (only 'default' rotary embeddings are implemented)")
    extra = set(source) - {"rope_type", "type", "rope_theta"}
    if extra:
      _reject(f"rope options {sorted(extra)} are not implemented")
  return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def config_from_hf(config_json: dict, **overrides) -> ModelConfig:
  """Translates a Hugging Face Qwen3MoeConfig dict (`config.json`) to a ModelConfig.

  Args:
    config_json: the parsed `config.json`.
    **overrides: ModelConfig fields Hugging Face does not describe (`param_dtype`,
      `compute_dtype`, `moe_impl`, `load_balance_coef`, ...).

  Returns:
    The ModelConfig.

  Raises:
    ValueError: another architecture, or an option this model does not implement.
  """
  hf = dict(config_json)
  archs = hf.get("architectures") or [ARCHITECTURE]
  if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE or ARCHITECTURE not in archs:
    _reject(f"architectures {archs} / model_type {hf.get('model_type')!r}; only "
            f"{ARCHITECTURE} (model_type {MODEL_TYPE!r}) is supported")
  missing = [k for k in _REQUIRED_KEYS if k not in hf]
  num_experts = hf.get("num_experts", hf.get("num_local_experts"))
  if num_experts is None:
    missing.append("num_experts")
  if missing:
    _reject(f"config.json lacks {missing}")
  if not num_experts:
    _reject("num_experts is 0 (a dense Qwen3, not a Mixture-of-Experts model)")
  if hf.get("hidden_act", "silu") != "silu":
    _reject(f"hidden_act {hf['hidden_act']!r} (only 'silu' SwiGLU is implemented)")
  if hf.get("attention_bias", False):
    _reject("attention_bias=true (attention projections here have no bias)")
  if hf.get("use_sliding_window", False):
    _reject("use_sliding_window=true (only full causal attention is implemented)")
  if any(t != "full_attention" for t in hf.get("layer_types") or ()):
    _reject(f"layer_types {hf['layer_types']} (only full_attention is implemented)")
  if hf.get("quantization_config"):
    _reject("quantization_config is set (quantised checkpoints are not read; use the "
            "bf16/fp32 release)")
  num_layers = int(hf["num_hidden_layers"])
  step = int(hf.get("decoder_sparse_step", 1))
  if step < 1:
    _reject(f"decoder_sparse_step must be >= 1, got {step}")
  # transformers: layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0.
  skip = set(hf.get("mlp_only_layers") or ()) | {
      i for i in range(num_layers) if (i + 1) % step}
  fields = dict(
      vocab_size=int(hf["vocab_size"]),
      d_model=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf["num_key_value_heads"]),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
      num_experts=int(num_experts),
      top_k=int(hf["num_experts_per_tok"]),
      expert_ffn_dim=int(hf["moe_intermediate_size"]),
      moe_layers_skip=tuple(sorted(skip)),
      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
      rope_theta=_rope_theta(hf),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  if hf.get("intermediate_size"):
    fields["dense_ffn_dim"] = int(hf["intermediate_size"])
  elif skip:
    _reject(f"layers {sorted(skip)} are dense but config.json lacks intermediate_size")
  dtype = hf.get("dtype", hf.get("torch_dtype"))
  if dtype in config_lib.DTYPES:
    fields["param_dtype"] = dtype
  return ModelConfig(**{**fields, **overrides})


def config_to_hf(cfg: ModelConfig, base: Optional[dict] = None) -> dict:
  """A transformers-4.x-style `config.json` dict (also read by transformers 5.x and vLLM).

  Args:
    cfg: the model.
    base: an original `config.json` whose other fields (token ids, max positions, ...)
      are kept; architecture fields are always taken from `cfg`.
  """
  hf = {k: v for k, v in (base or {}).items()
        if k not in ("rope_parameters", "num_local_experts", "quantization_config")}
  hf.update(
      architectures=[ARCHITECTURE], model_type=MODEL_TYPE,
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
      moe_intermediate_size=cfg.expert_ffn_dim, intermediate_size=cfg.dense_ffn_dim,
      mlp_only_layers=list(cfg.moe_layers_skip), decoder_sparse_step=1,
      norm_topk_prob=cfg.norm_topk_prob, rope_theta=cfg.rope_theta, rope_scaling=None,
      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      hidden_act="silu", attention_bias=False, use_sliding_window=False,
      torch_dtype=cfg.param_dtype)
  hf.setdefault("max_position_embeddings", 32_768)
  if "dtype" in hf:
    hf["dtype"] = cfg.param_dtype
  return hf


@dataclasses.dataclass(frozen=True)
class _Piece:
  """One Hugging Face tensor's share of one params leaf.

  `leaf[at] = to_leaf(tensor)`, where `at` indexes the leading (layer, expert) axes; export
  writes `from_leaf(leaf[at])` (None: import-only layout).
  """
  name: str
  leaf: tuple[str, ...]
  at: tuple[int, ...]
  hf_shape: tuple[int, ...]
  to_leaf: Callable[[np.ndarray], np.ndarray]
  from_leaf: Optional[Callable[[np.ndarray], np.ndarray]]


def _transposed(name, leaf, at, hf_shape):
  """A Linear weight: Hugging Face stores [out, in], the params [in, out]."""
  return _Piece(name, leaf, at, hf_shape, np.transpose, np.transpose)


def _split_heads(name, leaf, at, heads, head_dim, d):
  """q/k/v projection [heads * head_dim, d] <-> [d, heads, head_dim]."""
  return _Piece(name, leaf, at, (heads * head_dim, d),
                lambda w: w.T.reshape(d, heads, head_dim),
                lambda x: x.reshape(d, heads * head_dim).T)


def _attn_pieces(cfg, i):
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  pre = f"model.layers.{i}."
  return [
      _Piece(pre + "input_layernorm.weight", ("attn", "norm"), (i,), (d,), _same, _same),
      _split_heads(pre + "self_attn.q_proj.weight", ("attn", "wq"), (i,), h, k, d),
      _split_heads(pre + "self_attn.k_proj.weight", ("attn", "wk"), (i,), g, k, d),
      _split_heads(pre + "self_attn.v_proj.weight", ("attn", "wv"), (i,), g, k, d),
      _Piece(pre + "self_attn.o_proj.weight", ("attn", "wo"), (i,), (d, h * k),
             lambda w: w.T.reshape(h, k, d), lambda x: x.reshape(h * k, d).T),
      _Piece(pre + "self_attn.q_norm.weight", ("attn", "q_norm"), (i,), (k,), _same, _same),
      _Piece(pre + "self_attn.k_norm.weight", ("attn", "k_norm"), (i,), (k,), _same, _same),
  ]


def _same(x):
  return x


def _moe_pieces(cfg, i, j, fused):
  """Router and experts of layer i (MoE stack index j), per-expert or fused layout."""
  d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
  pre = f"model.layers.{i}.mlp."
  pieces = [_Piece(f"model.layers.{i}.post_attention_layernorm.weight", ("moe", "norm"),
                   (j,), (d,), _same, _same),
            _transposed(pre + "gate.weight", ("moe", "router"), (j,), (e, d))]
  if fused:  # [E, 2F, D] = gate rows then up rows; down [E, D, F].
    to_edf = lambda w: np.transpose(w, (0, 2, 1))
    return pieces + [
        _Piece(pre + "experts.gate_up_proj", ("moe", "w_gate"), (j,), (e, 2 * f, d),
               lambda w: to_edf(w[:, :f]), None),
        _Piece(pre + "experts.gate_up_proj", ("moe", "w_up"), (j,), (e, 2 * f, d),
               lambda w: to_edf(w[:, f:]), None),
        _Piece(pre + "experts.down_proj", ("moe", "w_down"), (j,), (e, d, f), to_edf, None)]
  for x in range(e):
    ex = f"{pre}experts.{x}."
    pieces += [_transposed(ex + "gate_proj.weight", ("moe", "w_gate"), (j, x), (f, d)),
               _transposed(ex + "up_proj.weight", ("moe", "w_up"), (j, x), (f, d)),
               _transposed(ex + "down_proj.weight", ("moe", "w_down"), (j, x), (d, f))]
  return pieces


def _dense_pieces(cfg, i, j):
  d, f = cfg.d_model, cfg.dense_ffn_dim
  pre = f"model.layers.{i}."
  return [
      _Piece(pre + "post_attention_layernorm.weight", ("mlp", "norm"), (j,), (d,), _same, _same),
      _transposed(pre + "mlp.gate_proj.weight", ("mlp", "w_gate"), (j,), (f, d)),
      _transposed(pre + "mlp.up_proj.weight", ("mlp", "w_up"), (j,), (f, d)),
      _transposed(pre + "mlp.down_proj.weight", ("mlp", "w_down"), (j,), (d, f))]


def _pieces(cfg: ModelConfig, fused_layers=frozenset()) -> list[_Piece]:
  """Every Hugging Face tensor of `cfg`, in checkpoint order, mapped onto the params."""
  v, d = cfg.vocab_size, cfg.d_model
  pieces = [_Piece("model.embed_tokens.weight", ("embed",), (), (v, d), _same, _same)]
  for i in range(cfg.num_layers):
    pieces += _attn_pieces(cfg, i)
    if i in cfg.moe_layers_skip:
      pieces += _dense_pieces(cfg, i, cfg.dense_layer_ids.index(i))
    else:
      pieces += _moe_pieces(cfg, i, cfg.moe_layer_ids.index(i), i in fused_layers)
  pieces.append(_Piece("model.norm.weight", ("final_norm",), (), (d,), _same, _same))
  if not cfg.tie_embeddings:
    pieces.append(_transposed("lm_head.weight", ("lm_head",), (), (v, d)))
  return pieces


def _leaf_shapes(cfg):
  """{leaf path: shape} of the params pytree (traced abstractly: allocates nothing)."""
  abstract = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
  return {path: x.shape for path, x in flax.traverse_util.flatten_dict(abstract).items()}


class _Reader:
  """Open safetensors files of one checkpoint directory; reads one tensor at a time."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p)
                     for p in glob.glob(os.path.join(directory, "*.safetensors")))
      weight_map = None
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {directory}")
    safe_open = _safetensors().safe_open
    self._handles = {f: safe_open(os.path.join(directory, f), framework="np") for f in files}
    self.files = {}
    for f, handle in self._handles.items():
      for name in handle.keys():
        if name in self.files:
          raise ValueError(f"{directory}: tensor {name} is in both {self.files[name]} and {f}")
        self.files[name] = f
    if weight_map is not None:
      lost = sorted(n for n, f in weight_map.items() if self.files.get(n) != f)
      if lost:
        raise ValueError(f"{INDEX_FILE} lists tensors its files lack, e.g. {lost[:5]}")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._handles[self.files[name]].get_tensor(name)


def _check_tensors(reader: _Reader, pieces: list[_Piece], cfg: ModelConfig, directory: str):
  """Raises on missing, unexpected or mis-shaped tensors, naming them."""
  expected = {p.name: p.hf_shape for p in pieces}
  missing = [n for n in expected if n not in reader.files]
  if missing:
    raise ValueError(f"{directory}: missing {len(missing)} tensor(s) the config requires, "
                     f"e.g. {missing[:5]}")
  # A tied checkpoint may still carry lm_head.weight (a copy of the embedding).
  ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in reader.files if n not in expected and n not in ignored
                      and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"{directory}: {len(unexpected)} unexpected tensor(s) the config does "
                     f"not describe, e.g. {unexpected[:5]}")
  for name, shape in expected.items():
    if reader.shape(name) != shape:
      raise ValueError(f"{directory}: tensor {name} has shape {list(reader.shape(name))}, "
                       f"the config implies {list(shape)}")


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
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  if dtype is not None:
    overrides["param_dtype"] = dtype
  cfg = config_from_hf(hf, **overrides)
  reader = _Reader(directory)
  fused = frozenset(i for i in cfg.moe_layer_ids
                    if f"model.layers.{i}.mlp.experts.gate_up_proj" in reader.files)
  for i in fused:
    per_expert = f"model.layers.{i}.mlp.experts.0.gate_proj.weight"
    if per_expert in reader.files:
      raise ValueError(f"{directory}: layer {i} stores experts both fused "
                       f"(model.layers.{i}.mlp.experts.gate_up_proj) and per expert "
                       f"({per_expert})")
  pieces = _pieces(cfg, fused)
  _check_tensors(reader, pieces, cfg, directory)
  shapes = _leaf_shapes(cfg)
  placement = _placement(shardings(cfg) if callable(shardings) else shardings, shapes)
  np_dtype = np.dtype(cfg.weight_dtype)
  params = {}
  for path, shape in shapes.items():
    leaf_pieces = [p for p in pieces if p.leaf == path]
    params[path] = _load_leaf(reader, leaf_pieces, shape, np_dtype, placement[path])
  return cfg, flax.traverse_util.unflatten_dict(params)


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

  def get(self, piece: _Piece) -> np.ndarray:
    if not piece.at:
      return np.asarray(self._flat[piece.leaf])
    key = (piece.leaf, piece.at[0])
    if key not in self._cache:
      if len(self._cache) >= self._capacity:
        self._cache.pop(next(iter(self._cache)))  # the oldest
      self._cache[key] = np.asarray(self._flat[piece.leaf][piece.at[0]])
    return self._cache[key][piece.at[1:]]


def _check_params(flat, cfg):
  want = _leaf_shapes(cfg)
  got = {path: tuple(x.shape) for path, x in flat.items()}
  if got != want:
    bad = sorted(p for p in set(want) | set(got) if want.get(p) != got.get(p))
    raise ValueError("params do not match the config at " + ", ".join(
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
  pieces = _pieces(cfg)
  itemsize = np.dtype(cfg.weight_dtype).itemsize
  shards = _plan_shards(pieces, itemsize, max_shard_bytes)
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
    json.dump(config_to_hf(cfg, base_config), f, indent=2, sort_keys=True)


PARAMS_DIR, MODEL_CONFIG, HF_CONFIG = "params", "model_config.json", "hf_config.json"


def hf_to_orbax(hf_dir: str, out_dir: str, *, dtype: Optional[str] = None,
                shardings: Any = None) -> ModelConfig:
  """Converts a Hugging Face checkpoint to `out_dir/{params, model_config.json, hf_config.json}`.

  `params` is an orbax checkpoint (`checkpoint.restore_params`), `model_config.json` the
  ModelConfig fields (`config.from_dict`), `hf_config.json` the original config.json, kept
  so `orbax_to_hf` can restore token ids and other fields the model does not use.
  """
  cfg, params = load_hf(hf_dir, dtype=dtype, shardings=shardings)
  os.makedirs(out_dir, exist_ok=True)
  checkpoint.save_params(os.path.join(out_dir, PARAMS_DIR), params)
  with open(os.path.join(out_dir, MODEL_CONFIG), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, HF_CONFIG))
  return cfg


def read_model_config(out_dir: str) -> ModelConfig:
  """The ModelConfig `hf_to_orbax` wrote to `out_dir`."""
  with open(os.path.join(out_dir, MODEL_CONFIG), encoding="utf-8") as f:
    return config_lib.from_dict(json.load(f))


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
  cfg = read_model_config(orbax_dir)
  base = None
  if os.path.exists(os.path.join(orbax_dir, HF_CONFIG)):
    with open(os.path.join(orbax_dir, HF_CONFIG), encoding="utf-8") as f:
      base = json.load(f)
  params = checkpoint.restore_params(params_dir or os.path.join(orbax_dir, PARAMS_DIR))
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
