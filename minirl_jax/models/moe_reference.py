"""Dense all-experts MoE: the reference the sparse dispatch is tested and benchmarked against.

Every expert runs on every token and non-selected experts get gate weight zero. The model
never calls this; it costs E/k times the FLOPs of `moe.moe_ffn`. It ships in the package,
not beside the tests, because `scripts/bench_moe.py` times and checks the sparse kernels
against it, and a user checking a kernel of their own needs the same reference.
"""
import jax
import jax.numpy as jnp

from minirl_jax.models import moe


def dense_moe_ffn(p, x_BTD, cfg, replay_BTk=None):
  """Same contract as `moe.moe_ffn` (output only)."""
  b, t, d = x_BTD.shape
  x_ND = x_BTD.reshape(b * t, d)
  logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), p["router"].astype(jnp.float32))
  replay_Nk = None if replay_BTk is None else replay_BTk.reshape(b * t, -1)
  ids_Nk, weights_Nk, _ = moe.route(logits_NE, cfg.top_k, cfg.norm_topk_prob, replay_Nk)
  gates_NE = jnp.zeros_like(logits_NE).at[jnp.arange(b * t)[:, None], ids_Nk].add(weights_Nk)
  w = jax.tree.map(lambda a: a.astype(x_ND.dtype), p)
  h_NEF = jax.nn.silu(jnp.einsum("nd,edf->nef", x_ND, w["w_gate"])) * jnp.einsum(
      "nd,edf->nef", x_ND, w["w_up"])
  y_NED = jnp.einsum("nef,efd->ned", h_NEF, w["w_down"])
  return jnp.einsum("ned,ne->nd", y_NED, gates_NE.astype(y_NED.dtype)).reshape(b, t, d)
