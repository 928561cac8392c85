"""Dense building blocks of the decoder: RMSNorm, rotary embeddings, attention, SwiGLU."""
import jax
import jax.numpy as jnp

from minirl_jax.models import linear

# Large finite negative logit: a fully masked row (a pad query) stays finite, never NaN.
MASK_VALUE = -1e30


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Qwen3 RMSNorm: normalise in float32, scale, cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def rope(x_BTNK: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embeddings in the Hugging Face (rotate-half) layout."""
  half = x_BTNK.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTk = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BTk)[:, :, None, :]
  sin = jnp.sin(angles_BTk)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNK.dtype)


def positions_from_mask(attn_mask_BT: jax.Array) -> jax.Array:
  """Position of each token counting only real tokens, so left padding shifts nothing."""
  return jnp.maximum(jnp.cumsum(attn_mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def qkv(p, x_BTD, positions_BT, cfg):
  """Projects to rotated, per-head-normalised queries and keys, and values."""
  q_BTHK = linear.einsum("btd,dhk->bthk", x_BTD, p["wq"])
  k_BTGK = linear.einsum("btd,dgk->btgk", x_BTD, p["wk"])
  v_BTGK = linear.einsum("btd,dgk->btgk", x_BTD, p["wv"])
  q_BTHK = rope(rms_norm(q_BTHK, p["q_norm"], cfg.rms_norm_eps), positions_BT, cfg.rope_theta)
  k_BTGK = rope(rms_norm(k_BTGK, p["k_norm"], cfg.rms_norm_eps), positions_BT, cfg.rope_theta)
  return q_BTHK, k_BTGK, v_BTGK


def attend(q_BTHK, k_BSGK, v_BSGK, key_valid_BS, query_slot_T, chunk: int = 0):
  """Grouped-query softmax attention.

  Query t sees key slot s iff `key_valid_BS[b, s]` and s <= `query_slot_T[t]` (causal over
  cache slots); `query_slot_T` may also be [B, T], one slot per row (the sampler's slots hold
  sequences at different positions). With `chunk` > 0, queries are taken `chunk` at a time
  and each chunk's scores are recomputed in the backward pass (`jax.checkpoint`), so neither
  the [T, S] mask nor more than [chunk, S] scores per head ever exist: memory O(T * chunk).
  """
  t = q_BTHK.shape[1]
  if not chunk or chunk >= t:
    return _attend_block(q_BTHK, k_BSGK, v_BSGK, key_valid_BS, query_slot_T)
  n = -(-t // chunk)
  pad = n * chunk - t
  # Padded queries have slot -1: they see nothing, stay finite, and are cut off below.
  q_nBcHK = jnp.pad(q_BTHK, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      q_BTHK.shape[0], n, chunk, *q_BTHK.shape[2:]).swapaxes(0, 1)
  pads = ((0, 0),) * (query_slot_T.ndim - 1) + ((0, pad),)
  slot_nc = jnp.pad(query_slot_T, pads, constant_values=-1).reshape(
      *query_slot_T.shape[:-1], n, chunk)
  slot_nc = jnp.moveaxis(slot_nc, -2, 0)
  block = jax.checkpoint(lambda qs: _attend_block(qs[0], k_BSGK, v_BSGK, key_valid_BS, qs[1]))
  out_nBcHK = jax.lax.map(block, (q_nBcHK, slot_nc))
  return out_nBcHK.swapaxes(0, 1).reshape(q_BTHK.shape[0], n * chunk,
                                          *q_BTHK.shape[2:])[:, :t]


def _attend_block(q_BTHK, k_BSGK, v_BSGK, key_valid_BS, query_slot_T):
  b, t, h, d = q_BTHK.shape
  g = k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(b, t, g, h // g, d)
  scores = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK,
                      preferred_element_type=jnp.float32) * d ** -0.5
  slots_S = jnp.arange(k_BSGK.shape[1])
  mask_BTS = key_valid_BS[:, None, :] & (slots_S <= query_slot_T[..., :, None])
  scores = jnp.where(mask_BTS[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSGK.dtype)
  out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BSGK)
  return out.reshape(b, t, h, d)


def swiglu(p, x_BTD):
  """Dense SwiGLU FFN (Qwen3 `mlp_only_layers`)."""
  gate = linear.einsum("btd,df->btf", x_BTD, p["w_gate"])
  up = linear.einsum("btd,df->btf", x_BTD, p["w_up"])
  return linear.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
