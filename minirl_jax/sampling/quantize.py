"""Trainer params -> sampler params: float casts, or int8 / fp8 / int4 weight records."""
import functools

import flax
import jax
import jax.numpy as jnp

from minirl_jax import errors
from minirl_jax import sections
from minirl_jax.models import linear
from minirl_jax.models import transformer
from minirl_jax.models import weights


class SamplerDtype(sections.Choice):
  """`sampler.dtype`: a float cast, or a quantised format (`linear.FORMATS` names)."""
  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"
  FLOAT16 = "float16"
  INT8 = "int8"
  FP8 = "fp8"
  INT4 = "int4"


FLOATS = (SamplerDtype.FLOAT32, SamplerDtype.BFLOAT16, SamplerDtype.FLOAT16)
QUANTIZED = (SamplerDtype.INT8, SamplerDtype.FP8, SamplerDtype.INT4)
DTYPES = SamplerDtype.values()
# Formats whose scales are grouped along the contracted axis; the others are per channel.
GROUPED = (SamplerDtype.INT4,)
DEFAULT_GROUP_SIZE = 32
# Float dtype of the weights a mode does not quantise. Quantised modes quantise only the
# matrices by default: the router stays float32 (routing decisions), and inference stacks
# (vLLM FP8, TensorRT-LLM) also keep the embedding and lm_head in 16 bits because their
# error lands directly on the logits and mu_logp; with the norms they are ~2% of
# Qwen3-30B-A3B. `quantize_embeddings=True` puts them on the grid too.
_FLOAT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "int8": jnp.bfloat16, "fp8": jnp.bfloat16, "int4": jnp.bfloat16}


def is_w8a8(dtype: str) -> bool:
  """Whether a sampler dtype quantises the activations too (8-bit x 8-bit dots)."""
  return dtype in linear.FORMATS and linear.FORMATS[dtype].activations is not None


def quantize(params, dtype: str, axes, *, group_size: int = DEFAULT_GROUP_SIZE,
             quantize_embeddings: bool = False, per_layer: bool = False):
  """Converts trainer params into params for a sampler of `dtype`.

  Args:
    params: from `transformer.init_params` (any float dtype).
    dtype: "float32", "bfloat16" or "float16" (casts; router kept float32), or a
      quantised format: "int8" (W8A8, int8 values with per-output-channel float32 scales),
      "fp8" (W8A8, float8_e4m3fn values with per-output-channel scales) or "int4"
      (weight-only, int4 values with one scale per `group_size` entries of the innermost
      contracted axis). Quantised formats turn the attention and FFN/expert matrices into
      `linear.QuantizedWeight` records, over `weights.contracted_axes`; the router stays
      float32 and the norms bfloat16.
    axes: `transformer.param_axes(model_cfg)`, parallel to `params`.
    group_size: int4's group size (the whole axis where it is smaller).
    quantize_embeddings: quantised formats only: the embedding table and lm_head carry the
      format's weight error too (one scale per vocabulary entry / per output column, int4
      grouped along "embed"). They are stored dequantised, in float32, because the
      forward's embedding gather and head matmul read plain arrays; without the flag they
      are bfloat16.
    per_layer: return the per-layer form (`transformer.unstack_layers`), which the
      sampler's decode loop reads in place; else stacked like `params`.

  Returns:
    A params pytree that `transformer.forward` accepts unchanged.

  Raises:
    ValueError: unknown `dtype`, a params leaf that `axes` does not describe (named), or a
      group size that does not divide a grouped axis (named).
  """
  if dtype not in DTYPES:
    raise errors.UserError(f"sampler.dtype must be one of {DTYPES}, got {dtype!r}")
  if not isinstance(group_size, int) or group_size < 1:
    raise errors.UserError(f"sampler.int4_group_size must be an integer >= 1, got {group_size!r}")
  flat_axes = flax.traverse_util.flatten_dict(axes)
  return _quantize(params, dtype, tuple(sorted(flat_axes.items())),
                   group_size if dtype in GROUPED else None, bool(quantize_embeddings),
                   bool(per_layer))


def for_sampler(params, sampler_cfg, axes):
  """`quantize` with every option a `SamplerConfig` sets (dtype, group size, embeddings),
  in the per-layer form (`transformer.unstack_layers`) unless `sampler_cfg.scan_layers`."""
  return quantize(params, sampler_cfg.dtype, axes, group_size=sampler_cfg.int4_group_size,
                  quantize_embeddings=sampler_cfg.quantize_embeddings,
                  per_layer=not sampler_cfg.scan_layers)


@functools.partial(jax.jit, static_argnames=("dtype", "axes", "group_size", "embeddings",
                                             "per_layer"))
def _quantize(params, dtype, axes, group_size, embeddings, per_layer):
  flat, axes = flax.traverse_util.flatten_dict(params), dict(axes)
  unknown = sorted("/".join(p) for p in flat.keys() ^ axes.keys())
  if unknown:
    raise ValueError(f"params and their axes differ at {unknown}")
  out = {}
  for path, w in flat.items():
    out[path] = _convert(w, dtype, axes[path], "/".join(path), group_size, embeddings)
  out = flax.traverse_util.unflatten_dict(out)
  # Sliced inside this program, each layer's arrays are written once: no stacked copy.
  return transformer.unstack_layers(out) if per_layer else out


def _convert(w, dtype, axes, name, group_size, embeddings):
  """One leaf in the sampler's representation."""
  if w.ndim != len(axes):
    raise ValueError(f"params leaf {name} has shape {w.shape} but axes {axes}")
  try:
    kind = weights.kind(axes)
  except ValueError as e:
    raise ValueError(f"params leaf {name}: {e}") from e
  try:
    if kind == "matrix" and dtype in QUANTIZED:
      return linear.quantize_weight(w, weights.contracted_axes(axes), dtype, group_size)
    if kind == "embedding" and dtype in QUANTIZED and embeddings:
      # lm_head contracts "embed"; the table is gathered by row, and a tied table is the
      # head transposed, so its scales are per row (over "embed") as well.
      scaled = weights.contracted_axes(axes) or (axes.index("embed"),)
      return linear.quantize_weight(w, scaled, dtype, group_size).dequantize(jnp.float32)
  except ValueError as e:
    raise ValueError(f"params leaf {name}: {e}") from e
  if kind == "router":
    return w.astype(jnp.float32)
  if kind in ("matrix", "embedding", "norm"):
    return w.astype(_FLOAT[dtype])
  raise ValueError(f"params leaf {name} is a {kind!r} weight, which quantize has no rule for")


def describe(params) -> dict:
  """The `quantize` options `params` were made with, as `options` spells them."""
  wq = params["attn"][0]["wq"] if transformer.is_per_layer(params) else params["attn"]["wq"]
  if not linear.is_quantized(wq):
    return {"dtype": jnp.dtype(wq.dtype).name}
  found = {"dtype": wq.format.name,
           "quantize_embeddings": jnp.dtype(params["embed"].dtype) == jnp.float32}
  if wq.format.name in GROUPED:  # wq: [(L,) D, H, K], D contracted
    found["group"] = wq.values.shape[-3] // wq.scale.shape[-3]
  return found


def options(sampler_cfg, d_model: int) -> dict:
  """What `describe` finds in `for_sampler(params, sampler_cfg, axes)` of a model."""
  wanted = {"dtype": sampler_cfg.dtype}
  if sampler_cfg.dtype in QUANTIZED:
    wanted["quantize_embeddings"] = sampler_cfg.quantize_embeddings
  if sampler_cfg.dtype in GROUPED:
    wanted["group"] = min(sampler_cfg.int4_group_size, d_model)
  return wanted


def weight_bytes(params) -> int:
  """Bytes the params occupy (quantised values and their scales included; int4 values at
  4 bits, as XLA stores them packed)."""
  return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(params))
