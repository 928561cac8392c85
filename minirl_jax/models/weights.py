"""What each weight is, derived from its logical axes (`transformer.param_axes`).

Init fan-in, int8 contraction axes and the weight-decay mask all read these facts, so a
new weight needs only its axes in `transformer._shapes`.
"""
import math

import jax

STACKING = ("layers", "expert")  # stacks of independent weights: never contracted
AXES = frozenset(STACKING + ("embed", "vocab", "heads", "kv_heads", "head_dim", "mlp",
                             "router", "norm"))


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def kind(axes: tuple[str, ...]) -> str:
  """The weight's kind: "norm", "router", "embedding" (table, lm_head) or "matrix".

  Raises:
    ValueError: `axes` is empty or names an axis outside `AXES`.
  """
  unknown = [a for a in axes if a not in AXES]
  if unknown:
    raise ValueError(f"weight axes {axes} fit no rule: unknown axis {unknown[0]!r}; "
                     f"known: {sorted(AXES)}")
  if not axes:
    raise ValueError("weight axes () fit no rule: a weight has at least one axis")
  if axes[-1] == "norm":
    return "norm"
  if "router" in axes:
    return "router"
  if "vocab" in axes:
    return "embedding"
  return "matrix"


def contracted_axes(axes: tuple[str, ...]) -> tuple[int, ...]:
  """Positions of the input (contracted) axes of the weight's matmul.

  The stacking axes ("layers", "expert") are never contracted. A weight whose last axis is
  "embed" writes into the residual stream and contracts every axis between the stacking
  axes and that last one (wo: heads, head_dim; w_down: mlp); any other weight contracts its
  "embed" axis (wq, wk, wv, w_gate, w_up, router, lm_head). Weights applied without a sum
  contract nothing and give (): norm gains scale elementwise, and token ids index the
  embedding table (a gather, so its fan-in is 1 and its init N(0, 1)).

  Raises:
    ValueError: `axes` fit no rule (see `kind`), or a matrix has no "embed" axis.
  """
  if kind(axes) == "norm":
    return ()
  if axes[-1] == "embed":
    inputs = tuple(i for i, a in enumerate(axes[:-1]) if a not in STACKING)
  elif "embed" in axes:
    inputs = (axes.index("embed"),)
  else:
    raise ValueError(f"weight axes {axes} fit no rule: no 'embed' axis to contract")
  if any(axes[i] == "vocab" for i in inputs):
    return ()
  return inputs


def fan_in(shape: tuple[int, ...], axes: tuple[str, ...]) -> int:
  """Product of the contracted dims: the N in an N(0, 1/N) init."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {shape} and axes {axes} differ in rank")
  return math.prod(shape[i] for i in contracted_axes(axes))


def decay_mask(axes_tree):
  """Pytree of bools parallel to the params: True on every weight but the norm gains."""
  return jax.tree.map(lambda axes: kind(axes) != "norm", axes_tree, is_leaf=_is_axes)
