"""Token log-probs and entropies from the final hidden states, in chunks.

The trainer needs log p(token) and the entropy at every response position, never the logits
themselves. Materialising float32 logits [B, T, V] costs 4 * B * T * V bytes: 21 TB for the
paper's global batch (1,024 x 33,792 tokens, V = 151,936). Here the positions go through the
lm head `seq_chunk` at a time (a `lax.map` whose body is rematerialised in the backward
pass, so only one chunk's logits exist at once, forward or backward), and for a large
vocabulary the head's columns go `vocab_chunk` at a time with an online log-sum-exp.
Values and gradients equal the unchunked `token_logp` + `diagnostics.token_entropy` up to
float32 rounding (tests/logprobs_test.py).
"""
import jax
import jax.numpy as jnp


def token_logp_entropy(x_BTD: jax.Array, head_DV: jax.Array, tokens_BT: jax.Array, *,
                       seq_chunk: int = 0, vocab_chunk: int = 0):
  """(logp_BT, entropy_BT) float32, aligned like `transformer.token_logp`.

  logp[b, t] = log p(tokens[b, t] | tokens[b, :t]) and entropy[b, t] is the entropy of the
  distribution token t was drawn from (predicted at t - 1); position 0 (no context) is 0.

  Args:
    x_BTD: final hidden states (after the final norm), in the compute dtype.
    head_DV: the lm head (or the transposed tied embedding), in the compute dtype.
    tokens_BT: the tokens.
    seq_chunk: positions per chunk; 0 or >= T - 1: one chunk.
    vocab_chunk: head columns per step of the online log-sum-exp; 0 or >= V: all at once.
  """
  b, t, _ = x_BTD.shape
  n = t - 1
  if n <= 0:
    zeros = jnp.zeros((b, t), jnp.float32)
    return zeros, zeros
  chunk = n if seq_chunk <= 0 else min(seq_chunk, n)
  num = -(-n // chunk)
  if num == 1:  # one chunk: no loop to compile
    logp, entropy = _chunk_stats(x_BTD[:, :-1], tokens_BT[:, 1:], head_DV, vocab_chunk)
    return jnp.pad(logp, ((0, 0), (1, 0))), jnp.pad(entropy, ((0, 0), (1, 0)))
  pad = num * chunk - n
  h = jnp.pad(x_BTD[:, :-1], ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, pad)))
  # [num, B, chunk, ...]: lax.map walks the chunks one after the other.
  h = jnp.moveaxis(h.reshape(b, num, chunk, -1), 1, 0)
  y = jnp.moveaxis(y.reshape(b, num, chunk), 1, 0)
  stats = jax.checkpoint(lambda hy: _chunk_stats(hy[0], hy[1], head_DV, vocab_chunk))
  logp, entropy = jax.lax.map(stats, (h, y))
  unchunk = lambda z: jnp.pad(jnp.moveaxis(z, 0, 1).reshape(b, num * chunk)[:, :n],
                              ((0, 0), (1, 0)))
  return unchunk(logp), unchunk(entropy)


def _chunk_stats(h_BCD, y_BC, head_DV, vocab_chunk):
  v = head_DV.shape[1]
  if vocab_chunk <= 0 or vocab_chunk >= v:
    z = _logits(h_BCD, head_DV)
    lse = jax.nn.logsumexp(z, axis=-1)
    target = jnp.take_along_axis(z, y_BC[..., None], axis=-1)[..., 0]
    gap = lse[..., None] - z  # -log p >= 0: no cancellation in the entropy's sum
    return target - lse, jnp.sum(jnp.exp(-gap) * gap, axis=-1)
  return _online_stats(h_BCD, y_BC, head_DV, vocab_chunk)


def _logits(h_BCD, head_DV):
  return jnp.einsum("bcd,dv->bcv", h_BCD, head_DV, preferred_element_type=jnp.float32)


def _online_stats(h_BCD, y_BC, head_DV, vocab_chunk):
  """One pass over the vocabulary in column blocks, with a running max m: s = sum e^(z - m)
  and u = sum e^(z - m) (m - z) >= 0, rescaled when m grows, and the target's logit. Then
  lse = m + log s and the entropy is log s + u / s (two non-negative terms: no
  cancellation). The last block is padded with columns that count for nothing."""
  d, v = head_DV.shape
  num = -(-v // vocab_chunk)
  head = jnp.pad(head_DV, ((0, 0), (0, num * vocab_chunk - v)))
  head = jnp.moveaxis(head.reshape(d, num, vocab_chunk), 1, 0)  # [num, D, Vc]

  def step(carry, block):
    m, s, u, target = carry
    index, head_DC = block
    cols = index * vocab_chunk + jnp.arange(vocab_chunk)
    valid = cols < v
    z = _logits(h_BCD, head_DC)
    m_new = jnp.maximum(m, jnp.max(jnp.where(valid, z, _FLOOR), axis=-1))
    gap = m_new[..., None] - z
    e = jnp.where(valid, jnp.exp(-gap), 0.0)
    scale = jnp.exp(m - m_new)
    u = scale * (u + s * (m_new - m)) + jnp.sum(e * gap, axis=-1)
    s = scale * s + jnp.sum(e, axis=-1)
    hit = cols[None, None, :] == y_BC[..., None]
    target = target + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    return (m_new, s, u, target), None

  shape = y_BC.shape
  zeros = jnp.zeros(shape, jnp.float32)
  init = (jnp.full(shape, _FLOOR, jnp.float32), zeros, zeros, zeros)
  (m, s, u, target), _ = jax.lax.scan(jax.checkpoint(step), init,
                                      (jnp.arange(num), head))
  return target - (m + jnp.log(s)), jnp.log(s) + u / s


# The running max before the first block: finite, so 0 * (m_new - m) stays 0 (never NaN).
_FLOOR = -1e30
