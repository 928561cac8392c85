"""The decoder: `init_params`, `param_axes` and `forward`, numerically Qwen3-MoE.

Params are a nested dict; per-layer weights are stacked on a leading layer axis and run
under `jax.lax.scan`. Attention weights are stacked over all L layers, MoE weights over the
MoE layers and dense-FFN weights over the `moe_layers_skip` layers; runs of consecutive
layers of one kind are scanned together. `unstack_layers` gives the per-layer form (a tuple
of one tree per layer), which runs as an unrolled loop: the sampler's decode loop uses it.
"""
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from minirl_jax.models import flash
from minirl_jax.models import layers
from minirl_jax.models import logprobs
from minirl_jax.models import linear
from minirl_jax.models import moe
from minirl_jax.models import weights
from minirl_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for the tokens seen so far (the sampler's state).

  Stored as a float cast, or quantised (int8, float8_e4m3fn) with one float32 scale per
  (layer, row, slot, kv head): k ~= k_LBSGK * k_scale_LBSG1. Reads dequantise. In the
  per-layer form (`unstack_layers`), each of the four per-layer fields is a tuple of one
  [B, S, G, K] ([B, S, G, 1]) array per layer.
  """
  k_LBSGK: jax.Array   # storage dtype
  v_LBSGK: jax.Array
  valid_BS: jax.Array  # bool: slot holds a real (non-pad) token
  # [] int32: slots written so far, the next write starts here; or [B]: one write slot per
  # row (the continuous-batching sampler, whose rows hold sequences at different positions)
  end: jax.Array
  k_scale_LBSG1: Optional[jax.Array] = None  # float32; None for float storage
  v_scale_LBSG1: Optional[jax.Array] = None


@flax.struct.dataclass
class ForwardAux:
  """What the forward reports besides logits. L counts MoE layers only."""
  routing: jax.Array             # [L, B, T, k] experts that ran (routing dtype)
  live_routing: jax.Array        # [L, B, T, k] the router's own top-k, even under replay
  router_logits: jax.Array       # [L, B, T, E] float32
  router_probs: jax.Array        # [L, B, T, E] float32
  expert_load: jax.Array         # [L, E] fraction of assignments per expert
  load_balance_loss: jax.Array   # [] mean over MoE layers
  router_z_loss: jax.Array       # [] mean over MoE layers
  aux_loss: jax.Array            # [] coefficient-weighted sum, add to the training loss
  kv_cache: Optional[KVCache] = None


def _shapes(cfg: ModelConfig):
  """Shape and logical axes of every parameter."""
  d, h, g, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  e, f, fd, v = cfg.num_experts, cfg.expert_ffn_dim, cfg.dense_ffn_dim, cfg.vocab_size
  nl, nm, nd = cfg.num_layers, cfg.num_moe_layers, len(cfg.dense_layer_ids)
  spec = {
      "embed": ((v, d), ("vocab", "embed")),
      "final_norm": ((d,), ("norm",)),
      "attn": {
          "norm": ((nl, d), ("layers", "norm")),
          "wq": ((nl, d, h, hd), ("layers", "embed", "heads", "head_dim")),
          "wk": ((nl, d, g, hd), ("layers", "embed", "kv_heads", "head_dim")),
          "wv": ((nl, d, g, hd), ("layers", "embed", "kv_heads", "head_dim")),
          "wo": ((nl, h, hd, d), ("layers", "heads", "head_dim", "embed")),
          "q_norm": ((nl, hd), ("layers", "norm")),
          "k_norm": ((nl, hd), ("layers", "norm")),
      },
  }
  if nm:
    spec["moe"] = {
        "norm": ((nm, d), ("layers", "norm")),
        "router": ((nm, d, e), ("layers", "embed", "router")),
        "w_gate": ((nm, e, d, f), ("layers", "expert", "embed", "mlp")),
        "w_up": ((nm, e, d, f), ("layers", "expert", "embed", "mlp")),
        "w_down": ((nm, e, f, d), ("layers", "expert", "mlp", "embed")),
    }
  if nd:
    spec["mlp"] = {
        "norm": ((nd, d), ("layers", "norm")),
        "w_gate": ((nd, d, fd), ("layers", "embed", "mlp")),
        "w_up": ((nd, d, fd), ("layers", "embed", "mlp")),
        "w_down": ((nd, fd, d), ("layers", "mlp", "embed")),
    }
  if not cfg.tie_embeddings:
    spec["lm_head"] = ((d, v), ("embed", "vocab"))
  return spec


def _is_spec(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_axes(cfg: ModelConfig):
  """Pytree parallel to the params: a tuple of logical axis names per leaf."""
  return jax.tree.map(lambda s: s[1], _shapes(cfg), is_leaf=_is_spec)


def init_params(cfg: ModelConfig, key: jax.Array):
  """Random params: norms at one, other weights N(0, 1/fan_in) (the embedding's is 1)."""
  flat = flax.traverse_util.flatten_dict(_shapes(cfg), is_leaf=lambda _, x: _is_spec(x))
  keys = jax.random.split(key, len(flat))
  params = {}
  for k, (path, (shape, axes)) in zip(keys, sorted(flat.items())):
    if weights.kind(axes) == "norm":
      params[path] = jnp.ones(shape, cfg.weight_dtype)
      continue
    std = cfg.init_std if cfg.init_std is not None else weights.fan_in(shape, axes) ** -0.5
    params[path] = (std * jax.random.normal(k, shape, jnp.float32)).astype(cfg.weight_dtype)
  return flax.traverse_util.unflatten_dict(params)


def init_kv_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  """An empty cache for `length` slots.

  Args:
    cfg: the model config the cache serves.
    batch, length: rows and slots.
    dtype: storage: None (cfg's compute dtype), a float dtype (cast on write), or a
      quantised `linear.FORMATS` name with per-(token, kv head) scales ("int8", "fp8").
  """
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  scale = None
  if dtype in linear.FORMATS:
    dtype, scale = linear.FORMATS[dtype].storage, jnp.ones(shape[:-1] + (1,), jnp.float32)
  dtype = dtype or cfg.dtype
  return KVCache(k_LBSGK=jnp.zeros(shape, dtype), v_LBSGK=jnp.zeros(shape, dtype),
                 valid_BS=jnp.zeros((batch, length), bool), end=jnp.zeros((), jnp.int32),
                 k_scale_LBSG1=scale, v_scale_LBSG1=scale)


def write_slots(x_BS, chunk_BT, end):
  """`chunk_BT` written into `x_BS` (any trailing axes) at slot `end`: [] for every row, or
  [B], one slot per row."""
  if jnp.ndim(end) == 0:
    return jax.lax.dynamic_update_slice_in_dim(x_BS, chunk_BT.astype(x_BS.dtype), end, 1)
  return jax.vmap(lambda x, c, e: jax.lax.dynamic_update_slice_in_dim(x, c, e, 0))(
      x_BS, chunk_BT.astype(x_BS.dtype), end)


def _cache_write(values_BSGK, scale_BSG1, x_BTGK, end):
  """Writes a chunk at slot `end`: cast, or quantised per (token, kv head) with a scale."""
  if scale_BSG1 is None:
    return write_slots(values_BSGK, x_BTGK, end), None
  fmt = linear.FORMATS_BY_STORAGE[jnp.dtype(values_BSGK.dtype)].name
  x_values, x_scale = linear.quantize_values(x_BTGK, (3,), fmt)
  return write_slots(values_BSGK, x_values, end), write_slots(scale_BSG1, x_scale, end)


def _cache_read(values_BSGK, scale_BSG1, dtype):
  if scale_BSG1 is None:
    return values_BSGK.astype(dtype)
  return (values_BSGK.astype(jnp.float32) * scale_BSG1).astype(dtype)


def _attention(p, x_BTD, positions_BT, visible, cfg, kv, end):
  """Self-attention sublayer; with a cache (`kv` = keys, values, their scales or None),
  writes this chunk's keys at `end` and attends to the whole (dequantised) cache."""
  q, k, v = layers.qkv(p, x_BTD, positions_BT, cfg)
  k_scale = v_scale = None
  if kv is not None:
    k, k_scale = _cache_write(kv[0], kv[2], k, end)
    v, v_scale = _cache_write(kv[1], kv[3], v, end)
    kv = (k, v, k_scale, v_scale)
  if kv is None and cfg.attention_impl == "flash":
    out = flash.self_attend(q, k, v, visible[0], cfg.attention_chunk)
  else:
    out = layers.attend(q, _cache_read(k, k_scale, q.dtype), _cache_read(v, v_scale, q.dtype),
                        *visible, chunk=cfg.attention_chunk)
  return linear.einsum("bthk,hkd->btd", out, p["wo"]), kv


def _layer_fn(kind, cfg, positions_BT, visible, valid_BT, end):
  """Scan body for one layer of `kind` ("moe" or "dense")."""
  def body(x_BTD, xs):
    attn_p, ffn_p, replay_BTk, kv = xs
    h = layers.rms_norm(x_BTD, attn_p["norm"], cfg.rms_norm_eps)
    attn_out, kv = _attention(attn_p, h, positions_BT, visible, cfg, kv, end)
    x_BTD = x_BTD + attn_out
    h = layers.rms_norm(x_BTD, ffn_p["norm"], cfg.rms_norm_eps)
    if kind == "moe":
      ffn_out, routing = moe.moe_ffn(ffn_p, h, cfg, valid_BT=valid_BT, replay_BTk=replay_BTk)
    else:
      ffn_out, routing = layers.swiglu(ffn_p, h), None
    return x_BTD + ffn_out, (routing, kv)
  return body


def _cast(tree, dtype):
  """Casts float weights to the compute dtype; quantised records keep float32 scales."""
  return jax.tree.map(lambda w: w.astype(dtype) if not linear.is_quantized(w)
                      and jnp.issubdtype(w.dtype, jnp.floating) and w.dtype != dtype else w,
                      tree, is_leaf=linear.is_quantized)


def _cast_moe(tree, dtype):
  """`_cast` but the router, which stays float32 (routing decisions)."""
  if isinstance(tree, tuple):
    return tuple(_cast_moe(layer, dtype) for layer in tree)
  return {**_cast(tree, dtype), "router": tree["router"]}


def unstack_layers(tree):
  """Per-layer form of a stacked params tree or KV cache: each "attn"/"moe"/"mlp" group
  (each cache field) becomes a tuple of one tree (array) per layer.

  `hidden_states` runs per-layer params as an unrolled loop instead of a scan. Under a
  decode `while_loop` that matters: a scan slices every layer's weights out of the stack
  (a copy, each step); separate arrays are read in place.
  """
  if isinstance(tree, KVCache):
    return tree.replace(**{f: None if c is None else _unstack(c)
                           for f, c in _cache_fields(tree)})
  return {k: _unstack(v) if k in ("attn", "moe", "mlp") else v for k, v in tree.items()}


def is_per_layer(params) -> bool:
  return isinstance(params["attn"], tuple)


def _cache_fields(cache):
  return [(f, getattr(cache, f)) for f in ("k_LBSGK", "v_LBSGK", "k_scale_LBSG1",
                                           "v_scale_LBSG1")]


def _unstack(tree):
  n = jax.tree.leaves(tree)[0].shape[0]
  return tuple(jax.tree.map(lambda w: w[i], tree) for i in range(n))


def _layer_range(tree, start, stop):
  """Layers [start, stop) of a stacked tree or of a per-layer tuple."""
  if isinstance(tree, tuple):
    return tree[start:stop]
  return jax.tree.map(lambda w: w[start:stop], tree)


def _join_layers(parts):
  """Segments' cache fields back into one: stacked arrays or per-layer tuples."""
  if parts[0] is None:
    return None
  return sum(parts, ()) if isinstance(parts[0], tuple) else jnp.concatenate(parts)


def _unrolled(body, x_BTD, attn_p, ffn_p, replay, kv):
  """`jax.lax.scan(body, x, xs)` over per-layer tuples: (x, (routing stacked, kv tuples))."""
  routings, kvs = [], []
  for i in range(len(attn_p)):
    kv_i = None if kv is None else tuple(None if c is None else c[i] for c in kv)
    x_BTD, (routing, kv_i) = body(
        x_BTD, (attn_p[i], ffn_p[i], None if replay is None else replay[i], kv_i))
    routings.append(routing)
    kvs.append(kv_i)
  routing = None if routings[0] is None else jax.tree.map(lambda *r: jnp.stack(r), *routings)
  kv = None if kv is None else tuple(
      None if parts[0] is None else tuple(parts) for parts in zip(*kvs))
  return x_BTD, (routing, kv)


def forward(params, tokens_BT: jax.Array, *, cfg: ModelConfig,
            attn_mask_BT: Optional[jax.Array] = None, routing: Optional[jax.Array] = None,
            kv_cache: Optional[KVCache] = None):
  """Runs the decoder: `hidden_states` through the lm head.

  Returns:
    (logits_BTV float32, ForwardAux). The trainer takes log-probs from the hidden states in
    chunks instead (`models.logprobs`), never holding [B, T, V].
  """
  x_BTD, aux = hidden_states(params, tokens_BT, cfg=cfg, attn_mask_BT=attn_mask_BT,
                             routing=routing, kv_cache=kv_cache)
  logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_weights(params, cfg),
                          preferred_element_type=jnp.float32)
  return logits_BTV, aux


def head_weights(params, cfg: ModelConfig) -> jax.Array:
  """The lm head [D, V] (the transposed embedding when tied), in the compute dtype."""
  head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  return head.astype(cfg.dtype)


def hidden_states(params, tokens_BT: jax.Array, *, cfg: ModelConfig,
                  attn_mask_BT: Optional[jax.Array] = None,
                  routing: Optional[jax.Array] = None, kv_cache: Optional[KVCache] = None):
  """Runs the decoder up to the final norm.

  Args:
    params: from `init_params` (or `sampling.quantize`).
    tokens_BT: int token ids; prompts are left-padded.
    cfg: ModelConfig.
    attn_mask_BT: False on padding; default all True.
    routing: [L, B, T, k] experts to replay in the MoE layers (L = MoE layers); rows whose
      first entry is -1 route live. None routes every token live.
    kv_cache: if given, `tokens_BT` continue the cached sequence: keys/values are written at
      `kv_cache.end` and queries attend to every valid cached slot (the sampler's path).

  Returns:
    (x_BTD after the final norm, in the compute dtype; ForwardAux).
  """
  b, t = tokens_BT.shape
  if attn_mask_BT is None:
    attn_mask_BT = jnp.ones((b, t), bool)
  attn_mask_BT = attn_mask_BT.astype(bool)
  positions_BT = layers.positions_from_mask(attn_mask_BT)
  # What each query sees (layers.attend): valid key slots up to its own slot.
  end = None
  if kv_cache is None:
    visible = (attn_mask_BT, jnp.arange(t))
  else:
    end = kv_cache.end
    positions_BT = positions_BT + jnp.sum(kv_cache.valid_BS, axis=1, keepdims=True)
    valid_BS = write_slots(kv_cache.valid_BS, attn_mask_BT, end)
    visible = (valid_BS, jnp.expand_dims(end, -1) + jnp.arange(t))
  x_BTD = jnp.take(params["embed"], tokens_BT, axis=0).astype(cfg.dtype)

  routings, kvs = [], []
  moe_at = dense_at = 0
  per_layer = is_per_layer(params)
  for kind, start, stop in cfg.segments():
    n = stop - start
    attn_p = _cast(_layer_range(params["attn"], start, stop), cfg.dtype)
    if kind == "moe":
      ffn_p = _cast_moe(_layer_range(params["moe"], moe_at, moe_at + n), cfg.dtype)
      replay = None if routing is None else routing[moe_at:moe_at + n]
      moe_at += n
    else:
      ffn_p = _cast(_layer_range(params["mlp"], dense_at, dense_at + n), cfg.dtype)
      replay = None
      dense_at += n
    kv = None if kv_cache is None else tuple(
        None if c is None else _layer_range(c, start, stop) for _, c in _cache_fields(kv_cache))
    body = _layer_fn(kind, cfg, positions_BT, visible, attn_mask_BT, end)
    if cfg.remat:  # inside a scan CSE is no risk; unrolled, it would undo the remat
      body = jax.checkpoint(body, prevent_cse=per_layer)
    if per_layer:
      x_BTD, (seg_routing, seg_kv) = _unrolled(body, x_BTD, attn_p, ffn_p, replay, kv)
    else:
      x_BTD, (seg_routing, seg_kv) = jax.lax.scan(body, x_BTD, (attn_p, ffn_p, replay, kv))
    if seg_routing is not None:
      routings.append(seg_routing)
    kvs.append(seg_kv)

  x_BTD = layers.rms_norm(x_BTD, params["final_norm"], cfg.rms_norm_eps)

  new_cache = None
  if kv_cache is not None:
    k, v, k_scale, v_scale = (_join_layers(parts) for parts in zip(*kvs))
    new_cache = KVCache(k_LBSGK=k, v_LBSGK=v, valid_BS=valid_BS, end=end + t,
                        k_scale_LBSG1=k_scale, v_scale_LBSG1=v_scale)
  return x_BTD, _collect_aux(routings, cfg, b, t, new_cache)


def _collect_aux(routings, cfg, b, t, kv_cache):
  if routings:
    r = jax.tree.map(lambda *xs: jnp.concatenate(xs), *routings)
    lb, z = jnp.mean(r.load_balance_loss), jnp.mean(r.router_z_loss)
  else:  # a dense model
    e, k = cfg.num_experts, cfg.top_k
    ids = jnp.zeros((0, b, t, k), cfg.routing_dtype)
    r = moe.Routing(ids_BTk=ids, live_ids_BTk=ids,
                    logits_BTE=jnp.zeros((0, b, t, e)), probs_BTE=jnp.zeros((0, b, t, e)),
                    load_E=jnp.zeros((0, e)), load_balance_loss=None, router_z_loss=None)
    lb = z = jnp.zeros(())
  return ForwardAux(
      routing=r.ids_BTk, live_routing=r.live_ids_BTk, router_logits=r.logits_BTE,
      router_probs=r.probs_BTE, expert_load=r.load_E, load_balance_loss=lb, router_z_loss=z,
      aux_loss=cfg.load_balance_coef * lb + cfg.router_z_coef * z, kv_cache=kv_cache)


def token_logp_entropy(params, tokens_BT: jax.Array, *, cfg: ModelConfig,
                       attn_mask_BT: Optional[jax.Array] = None,
                       routing: Optional[jax.Array] = None):
  """(logp_BT, entropy_BT, ForwardAux) by teacher forcing, aligned like `token_logp`, the
  logits taken `cfg.logits_chunk` positions (and `cfg.vocab_chunk` columns) at a time."""
  x_BTD, aux = hidden_states(params, tokens_BT, cfg=cfg, attn_mask_BT=attn_mask_BT,
                             routing=routing)
  logp, entropy = logprobs.token_logp_entropy(
      x_BTD, head_weights(params, cfg), tokens_BT, seq_chunk=cfg.logits_chunk,
      vocab_chunk=cfg.vocab_chunk)
  return logp, entropy, aux


def token_logp(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """logp[b, t] = log p(tokens[b, t] | tokens[b, :t]); position 0 (no context) is 0."""
  logp_all = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp_all, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(logp, ((0, 0), (1, 0)))
