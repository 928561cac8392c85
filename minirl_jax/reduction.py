"""How a step metric becomes one number, declared by the module that produces it.

An update's metrics come from n micro-batches (inside one jitted update) and a step's from
N mini-batch updates. Each metric's `Reduce` says how both combine; every producer
declares its metrics in a `{name: Reduce}` dict beside the code that computes them
(`objectives.METRICS`, `rl.losses.METRICS`, `rl.train_state.METRICS`), and reducing a
metric that no declaration names raises `UndeclaredMetric`: no metric gets a default
rule by accident.
"""
import enum
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np


class Reduce(enum.Enum):
  """A metric's reduction over micro-batches and over mini-batches (`HOW`)."""
  # A mean over loss tokens divided by the (mini-)batch's GLOBAL token count: the
  # micro-batches' parts add up; mini-batches weigh by their token counts.
  TOKEN_MEAN = "token_mean"
  # Divided by another GLOBAL count of the mini-batch (sequences, or a loss's own
  # normaliser): parts add up; equal-size mini-batches average.
  BATCH_MEAN = "batch_mean"
  MAX = "max"
  # A mean within each forward (router statistics): forwards and updates average.
  FORWARD_MEAN = "forward_mean"
  # Once per optimizer update (norms, skipped updates): updates average.
  UPDATE = "update"
  # Measured once on the whole batch (pi_old's train-infer mismatch); an objective's
  # per-mini-batch copy adds up over micro-batches and is dropped from the step.
  FULL_BATCH = "full_batch"


# (over micro-batches, over mini-batches)
HOW = {Reduce.TOKEN_MEAN: ("sum", "token_weighted"), Reduce.BATCH_MEAN: ("sum", "mean"),
       Reduce.MAX: ("max", "max"), Reduce.FORWARD_MEAN: ("mean", "mean"),
       Reduce.UPDATE: ("mean", "mean"), Reduce.FULL_BATCH: ("sum", "drop")}


class UndeclaredMetric(KeyError):
  """A metric reached a reduction that no producer declared."""


def merge(*declarations: Mapping[str, Reduce]) -> dict[str, Reduce]:
  """One rule table from several producers' declarations (a name declared twice must
  agree)."""
  rules: dict[str, Reduce] = {}
  for declared in declarations:
    for name, rule in declared.items():
      if rules.setdefault(name, rule) is not rule:
        raise ValueError(f"metric {name!r} declared as {rules[name]} and as {rule}")
  return rules


def rule_of(name: str, rules: Mapping[str, Reduce]) -> Reduce:
  try:
    return rules[name]
  except KeyError:
    raise UndeclaredMetric(
        f"metric {name!r} declares no reduction: add it to the METRICS of the module that "
        "produces it (minirl_jax/reduction.py)") from None


def over_micro_batches(stacked: Mapping, rules: Mapping[str, Reduce]) -> dict:
  """One value per metric from n micro-batches' metrics stacked on axis 0 (inside jit)."""
  ops = {"sum": jnp.sum, "max": jnp.max, "mean": jnp.mean}
  return {k: ops[HOW[rule_of(k, rules)][0]](v) for k, v in stacked.items()}


def over_mini_batches(per_update: Sequence, rules: Mapping[str, Reduce]) -> dict[str, float]:
  """One step value per metric from `[(metrics, num_tokens)]` of the N updates (host)."""
  weights = np.array([float(n) for _, n in per_update])
  out = {}
  for key in per_update[0][0]:
    how = HOW[rule_of(key, rules)][1]
    if how == "drop":
      continue
    values = np.array([float(m[key]) for m, _ in per_update])
    if how == "max":
      out[key] = float(values.max())
    elif how == "token_weighted":
      out[key] = float(np.sum(values * weights) / np.sum(weights))
    else:
      out[key] = float(values.mean())
  return out
