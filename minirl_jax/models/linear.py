"""Weight contractions: the one place that knows how a weight is stored.

Every matmul against a parameter goes through `einsum` and every per-expert weight gather
through `take`, so the sampler can swap in quantised weights without a second model.
"""
import jax
import jax.numpy as jnp


def einsum(eqn: str, x: jax.Array, w) -> jax.Array:
  """`jnp.einsum(eqn, x, w)` computed in x's dtype."""
  return jnp.einsum(eqn, x, w.astype(x.dtype))


def take(w, index: jax.Array):
  """Gathers rows of a weight along its leading (expert) axis."""
  return w[index]
