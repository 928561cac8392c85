"""Chunked token log-probs and entropies equal the full-logits path, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax.models import logprobs
from minirl_jax.models import transformer
from minirl_jax.objectives import diagnostics

B, T, D, V = 3, 11, 16, 37


def _inputs():
  kx, kh, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (B, T, D), jnp.float32)
  head = jax.random.normal(kh, (D, V), jnp.float32) * 2.0  # peaked and flat rows alike
  tokens = jax.random.randint(kt, (B, T), 0, V)
  return x, head, tokens


def _reference(x, head, tokens):
  logits = jnp.einsum("btd,dv->btv", x, head)
  entropy = jnp.pad(diagnostics.token_entropy(logits[:, :-1]), ((0, 0), (1, 0)))
  return transformer.token_logp(logits, tokens), entropy


def _objective(fn):
  """A scalar that weighs every position's log-prob and entropy differently."""
  def f(x, head, tokens):
    logp, entropy = fn(x, head, tokens)
    w = jnp.linspace(-1.0, 2.0, logp.size).reshape(logp.shape)
    return jnp.sum(w * logp) + jnp.sum(jnp.cos(w) * entropy)
  return f


@pytest.mark.parametrize("seq_chunk,vocab_chunk", [(0, 0), (3, 0), (4, 7), (100, 8), (1, 37)])
def test_chunked_values_and_gradients_equal_full_logits(seq_chunk, vocab_chunk):
  x, head, tokens = _inputs()
  chunked = lambda x, h, t: logprobs.token_logp_entropy(x, h, t, seq_chunk=seq_chunk,
                                                        vocab_chunk=vocab_chunk)
  got, want = jax.jit(chunked)(x, head, tokens), _reference(x, head, tokens)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  assert float(got[0][0, 0]) == float(got[1][0, 0]) == 0.0  # no context at position 0
  grads = jax.jit(jax.grad(_objective(chunked), argnums=(0, 1)))(x, head, tokens)
  ref_grads = jax.grad(_objective(_reference), argnums=(0, 1))(x, head, tokens)
  for g, w in zip(grads, ref_grads):  # relative to the gradient's norm
    assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < 1e-6


def test_chunked_program_never_holds_full_logits():
  """The compiled program's largest temporary is one chunk's logits, not [B, T, V]."""
  x, head, tokens = _inputs()
  big = jnp.zeros((4, 257, D)), jnp.zeros((D, 4096)), jnp.zeros((4, 257), jnp.int32)
  def temp_bytes(**chunks):
    fn = lambda *a: jax.grad(_objective(
        lambda x, h, t: logprobs.token_logp_entropy(x, h, t, **chunks)))(*a)
    return jax.jit(fn).lower(*big).compile().memory_analysis().temp_size_in_bytes
  full_logits = 4 * 256 * 4096 * 4
  assert temp_bytes(seq_chunk=0) > full_logits
  assert temp_bytes(seq_chunk=32, vocab_chunk=512) < full_logits / 8
