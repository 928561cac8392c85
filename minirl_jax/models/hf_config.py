"""Hugging Face Qwen3-MoE <-> minirl_jax: config translation and the tensor layout map.

Pure: which Hugging Face tensor fills which region of which params leaf, and how it is
transposed on the way. Reading and writing the files is `minirl_jax.hf_io`.
"""
import dataclasses
from typing import Callable, Collection, Mapping, Optional

import flax
import jax
import numpy as np

from minirl_jax import errors
from minirl_jax.models import config as config_lib
from minirl_jax.models.config import ModelConfig
from minirl_jax.models import transformer

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "moe_intermediate_size", "num_experts_per_tok")


def _reject(message):
  raise errors.UserError(f"Unsupported Hugging Face config: {message}")


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
class Piece:
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
  return Piece(name, leaf, at, hf_shape, np.transpose, np.transpose)


def _split_heads(name, leaf, at, heads, head_dim, d):
  """q/k/v projection [heads * head_dim, d] <-> [d, heads, head_dim]."""
  return Piece(name, leaf, at, (heads * head_dim, d),
               lambda w: w.T.reshape(d, heads, head_dim),
               lambda x: x.reshape(d, heads * head_dim).T)


def _attn_pieces(cfg, i):
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  pre = f"model.layers.{i}."
  return [
      Piece(pre + "input_layernorm.weight", ("attn", "norm"), (i,), (d,), _same, _same),
      _split_heads(pre + "self_attn.q_proj.weight", ("attn", "wq"), (i,), h, k, d),
      _split_heads(pre + "self_attn.k_proj.weight", ("attn", "wk"), (i,), g, k, d),
      _split_heads(pre + "self_attn.v_proj.weight", ("attn", "wv"), (i,), g, k, d),
      Piece(pre + "self_attn.o_proj.weight", ("attn", "wo"), (i,), (d, h * k),
            lambda w: w.T.reshape(h, k, d), lambda x: x.reshape(h * k, d).T),
      Piece(pre + "self_attn.q_norm.weight", ("attn", "q_norm"), (i,), (k,), _same, _same),
      Piece(pre + "self_attn.k_norm.weight", ("attn", "k_norm"), (i,), (k,), _same, _same),
  ]


def _same(x):
  return x


def _moe_pieces(cfg, i, j, fused):
  """Router and experts of layer i (MoE stack index j), per-expert or fused layout."""
  d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
  pre = f"model.layers.{i}.mlp."
  pieces = [Piece(f"model.layers.{i}.post_attention_layernorm.weight", ("moe", "norm"),
                  (j,), (d,), _same, _same),
            _transposed(pre + "gate.weight", ("moe", "router"), (j,), (e, d))]
  if fused:  # [E, 2F, D] = gate rows then up rows; down [E, D, F].
    to_edf = lambda w: np.transpose(w, (0, 2, 1))
    return pieces + [
        Piece(pre + "experts.gate_up_proj", ("moe", "w_gate"), (j,), (e, 2 * f, d),
              lambda w: to_edf(w[:, :f]), None),
        Piece(pre + "experts.gate_up_proj", ("moe", "w_up"), (j,), (e, 2 * f, d),
              lambda w: to_edf(w[:, f:]), None),
        Piece(pre + "experts.down_proj", ("moe", "w_down"), (j,), (e, d, f), to_edf, None)]
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
      Piece(pre + "post_attention_layernorm.weight", ("mlp", "norm"), (j,), (d,), _same, _same),
      _transposed(pre + "mlp.gate_proj.weight", ("mlp", "w_gate"), (j,), (f, d)),
      _transposed(pre + "mlp.up_proj.weight", ("mlp", "w_up"), (j,), (f, d)),
      _transposed(pre + "mlp.down_proj.weight", ("mlp", "w_down"), (j,), (d, f))]


def layout(cfg: ModelConfig, fused: Collection[int] = frozenset()) -> list[Piece]:
  """Every Hugging Face tensor of `cfg`, in checkpoint order, mapped onto the params.

  Args:
    cfg: the model.
    fused: MoE layers whose experts are stored fused (see `fused_layers`).
  """
  v, d = cfg.vocab_size, cfg.d_model
  out = [Piece("model.embed_tokens.weight", ("embed",), (), (v, d), _same, _same)]
  for i in range(cfg.num_layers):
    out += _attn_pieces(cfg, i)
    if i in cfg.moe_layers_skip:
      out += _dense_pieces(cfg, i, cfg.dense_layer_ids.index(i))
    else:
      out += _moe_pieces(cfg, i, cfg.moe_layer_ids.index(i), i in fused)
  out.append(Piece("model.norm.weight", ("final_norm",), (), (d,), _same, _same))
  if not cfg.tie_embeddings:
    out.append(_transposed("lm_head.weight", ("lm_head",), (), (v, d)))
  return out


def leaf_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{leaf path: shape} of the params pytree (traced abstractly: allocates nothing)."""
  abstract = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
  return {path: x.shape for path, x in flax.traverse_util.flatten_dict(abstract).items()}


def fused_layers(cfg: ModelConfig, names: Collection[str]) -> frozenset[int]:
  """The MoE layers whose experts the tensor `names` store fused (transformers 5.x in memory).

  Raises:
    ValueError: a layer stores its experts both fused and per expert.
  """
  fused = frozenset(i for i in cfg.moe_layer_ids
                    if f"model.layers.{i}.mlp.experts.gate_up_proj" in names)
  for i in sorted(fused):
    per_expert = f"model.layers.{i}.mlp.experts.0.gate_proj.weight"
    if per_expert in names:
      raise ValueError(f"layer {i} stores experts both fused "
                       f"(model.layers.{i}.mlp.experts.gate_up_proj) and per expert "
                       f"({per_expert})")
  return fused


def check_tensors(shapes: Mapping[str, tuple[int, ...]], pieces: list[Piece],
                  cfg: ModelConfig) -> None:
  """Raises ValueError on missing, unexpected or mis-shaped tensors, naming them.

  Args:
    shapes: {name: shape} of every tensor a checkpoint holds.
    pieces: `layout(cfg, ...)`.
    cfg: the model.
  """
  expected = {p.name: p.hf_shape for p in pieces}
  missing = [n for n in expected if n not in shapes]
  if missing:
    raise ValueError(f"missing {len(missing)} tensor(s) the config requires, "
                     f"e.g. {missing[:5]}")
  # A tied checkpoint may still carry lm_head.weight (a copy of the embedding).
  ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in shapes if n not in expected and n not in ignored
                      and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"{len(unexpected)} unexpected tensor(s) the config does not describe, "
                     f"e.g. {unexpected[:5]}")
  for name, shape in expected.items():
    if tuple(shapes[name]) != shape:
      raise ValueError(f"tensor {name} has shape {list(shapes[name])}, the config implies "
                       f"{list(shape)}")
