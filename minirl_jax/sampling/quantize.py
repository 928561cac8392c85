"""Trainer params -> sampler params: float32, bfloat16 casts, or int8 W8A8 weight records."""
import functools

import flax
import jax
import jax.numpy as jnp

from minirl_jax.models import linear

DTYPES = ("float32", "bfloat16", "int8")

# Weights quantised in int8 mode, with their contracted (input) axes; axis 0 is the layer
# stack. Everything else keeps a float dtype: the router (float32 routing decisions),
# norms, and the embedding and lm_head, which inference stacks (vLLM FP8, TensorRT-LLM)
# also keep in 16 bits because their error lands directly on the logits and mu_logp;
# together they are ~2% of Qwen3-30B-A3B's weights.
INT8_CONTRACT_AXES = {
    ("attn", "wq"): (1,), ("attn", "wk"): (1,), ("attn", "wv"): (1,), ("attn", "wo"): (1, 2),
    ("moe", "w_gate"): (2,), ("moe", "w_up"): (2,), ("moe", "w_down"): (2,),
    ("mlp", "w_gate"): (1,), ("mlp", "w_up"): (1,), ("mlp", "w_down"): (1,),
}
FLOAT32_WEIGHTS = {("moe", "router")}


def quantize(params, dtype: str):
  """Converts trainer params into params for a sampler of `dtype`.

  Args:
    params: from `transformer.init_params` (any float dtype).
    dtype: "float32" (cast), "bfloat16" (cast; router kept float32) or "int8" (attention
      and FFN/expert weights become `linear.QuantizedWeight` with per-output-channel
      float32 scales; router float32; embedding, lm_head and norms bfloat16).

  Returns:
    A params pytree that `transformer.forward` accepts unchanged.
  """
  if dtype not in DTYPES:
    raise ValueError(f"sampler.dtype must be one of {DTYPES}, got {dtype!r}")
  return _quantize(params, dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _quantize(params, dtype):
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for path, w in flat.items():
    key = path[-2:]
    if dtype == "int8" and key in INT8_CONTRACT_AXES:
      out[path] = linear.quantize_weight(w, INT8_CONTRACT_AXES[key])
    elif dtype == "float32" or key in FLOAT32_WEIGHTS:
      out[path] = w.astype(jnp.float32)
    else:
      out[path] = w.astype(jnp.bfloat16)
  return flax.traverse_util.unflatten_dict(out)


def weight_bytes(params) -> int:
  """Bytes the params occupy (int8 values and their scales included)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
