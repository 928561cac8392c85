"""Trainer params -> sampler params: float32, bfloat16 casts, or int8 W8A8 weight records."""
import functools

import flax
import jax
import jax.numpy as jnp

from minirl_jax.models import linear
from minirl_jax.models import weights

DTYPES = ("float32", "bfloat16", "int8")
# Float dtype of the weights a mode does not quantise. int8 mode quantises only the
# matrices: the router stays float32 (routing decisions), and inference stacks (vLLM FP8,
# TensorRT-LLM) also keep the embedding and lm_head in 16 bits because their error lands
# directly on the logits and mu_logp; with the norms they are ~2% of Qwen3-30B-A3B.
_FLOAT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.bfloat16}


def quantize(params, dtype: str, axes):
  """Converts trainer params into params for a sampler of `dtype`.

  Args:
    params: from `transformer.init_params` (any float dtype).
    dtype: "float32" (cast), "bfloat16" (cast; router kept float32) or "int8" (attention
      and FFN/expert matrices become `linear.QuantizedWeight` with per-output-channel
      float32 scales over `weights.contracted_axes`; router float32; embedding, lm_head
      and norms bfloat16).
    axes: `transformer.param_axes(model_cfg)`, parallel to `params`.

  Returns:
    A params pytree that `transformer.forward` accepts unchanged.

  Raises:
    ValueError: unknown `dtype`, or a params leaf that `axes` does not describe (named).
  """
  if dtype not in DTYPES:
    raise ValueError(f"sampler.dtype must be one of {DTYPES}, got {dtype!r}")
  flat_axes = flax.traverse_util.flatten_dict(axes)
  return _quantize(params, dtype, tuple(sorted(flat_axes.items())))


@functools.partial(jax.jit, static_argnames=("dtype", "axes"))
def _quantize(params, dtype, axes):
  flat, axes = flax.traverse_util.flatten_dict(params), dict(axes)
  unknown = sorted("/".join(p) for p in flat.keys() ^ axes.keys())
  if unknown:
    raise ValueError(f"params and their axes differ at {unknown}")
  out = {}
  for path, w in flat.items():
    out[path] = _convert(w, dtype, axes[path], "/".join(path))
  return flax.traverse_util.unflatten_dict(out)


def _convert(w, dtype, axes, name):
  """One leaf in the sampler's representation."""
  if w.ndim != len(axes):
    raise ValueError(f"params leaf {name} has shape {w.shape} but axes {axes}")
  try:
    kind = weights.kind(axes)
  except ValueError as e:
    raise ValueError(f"params leaf {name}: {e}") from e
  if kind == "matrix" and dtype == "int8":
    return linear.quantize_weight(w, weights.contracted_axes(axes))
  if kind == "router":
    return w.astype(jnp.float32)
  if kind in ("matrix", "embedding", "norm"):
    return w.astype(_FLOAT[dtype])
  raise ValueError(f"params leaf {name} is a {kind!r} weight, which quantize has no rule for")


def weight_bytes(params) -> int:
  """Bytes the params occupy (int8 values and their scales included)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
