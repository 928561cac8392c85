"""The train-infer gap, dialled: the same prompts sampled by each sampler format, measured
against the trainer's pi_old (KL, IS weights, TIS truncation, routing, first-order error).

The `zero` level is the zero-gap control: the float32 sampler's tokens with mu := pi_old,
the trainer's own log-probs and routing, so every gap metric is exactly 0 by construction.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import batch as batch_lib
from minirl_jax import errors
from minirl_jax import objectives
from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.rl import gap_levels
from minirl_jax.rl import rollout as rollout_lib
from minirl_jax.rl import step as step_lib
from minirl_jax.sampling import quantize

_COLUMNS = (("kl_k1", "KL k1", ".2e"), ("kl_k3", "KL k3", ".2e"), ("is_p99", "IS p99", ".4f"),
            ("is_max", "IS max", ".4f"), ("tis_frac_truncated", "TIS trunc", ".2e"),
            ("routing_disagreement_mean", "route dis", ".4f"),
            ("first_order_error_mean", "1st-ord err", ".2e"),
            ("first_order_error_max", "1st-ord max", ".2e"))


def parse_level(level: str):
  """"dtype[:activation_dtype]" (as scripts/bench_sampler.py spells them) -> (dtype, act)."""
  dtype, _, activations = level.partition(":")
  if dtype not in quantize.DTYPES:
    raise errors.UserError(f"level {level!r}: the dtype must be one of {quantize.DTYPES}")
  return dtype, activations or None


def metrics(old_logp, mu_logp, loss_mask, attn_mask, routing_mu, live_routing, *,
            tis_cap) -> dict:
  """The gap between a sampler (mu) and the trainer (pi_old) on one set of rollouts.

  Args:
    old_logp, mu_logp: [B, T] log pi_old and log mu of each token.
    loss_mask: [B, T] completion tokens to measure.
    attn_mask: [B, T] positions whose routing counts.
    routing_mu, live_routing: [L, B, T, k] the sampler's experts and the trainer router's
      own top-k.
    tis_cap: `objective.tis_cap` (None: nothing is truncated).

  Returns:
    Floats: `tokens`, `kl_k1` (mean log mu - log pi_old), `kl_k3`, `is_p99` and `is_max`
    of the token IS weight pi_old/mu, `tis_frac_truncated` (weights above the cap),
    `routing_disagreement` (a list, one per MoE layer) and its mean,
    `first_order_error_mean` / `_max` over sequences (`objectives.first_order_error`
    with logp = old_logp: the train-infer factor alone).
  """
  loss_mask = jnp.asarray(loss_mask, jnp.float32)
  count = jnp.maximum(jnp.sum(loss_mask), 1.0)
  batch = batch_lib.TrainBatch(
      tokens=jnp.zeros(loss_mask.shape, jnp.int32), attn_mask=attn_mask, loss_mask=loss_mask,
      advantages=jnp.zeros(loss_mask.shape[:1]), old_logp=old_logp, mu_logp=mu_logp,
      num_sequences=jnp.float32(loss_mask.shape[0]), num_tokens=count)
  mismatch = objectives.diagnostics.mismatch_metrics(batch)
  error_B = np.asarray(objectives.first_order_error(batch.old_logp, batch))
  has_tokens_B = np.asarray(jnp.sum(loss_mask, axis=1) > 0)
  mask = np.asarray(loss_mask) > 0
  log_w = (np.asarray(old_logp, np.float64) - np.asarray(mu_logp, np.float64))[mask]
  weight = np.exp(log_w) if log_w.size else np.ones(1)
  routing = [float(step_lib.routing_disagreement(routing_mu[i:i + 1], live_routing[i:i + 1],
                                                 attn_mask))
             for i in range(routing_mu.shape[0])]
  return {
      "tokens": int(mask.sum()),
      "kl_k1": float(mismatch["mismatch/kl_mu_pi_old"]),
      "kl_k3": float(mismatch["mismatch/kl_k3"]),
      "is_p99": float(np.percentile(weight, 99)),
      "is_max": float(weight.max()),
      "tis_frac_truncated": float(np.mean(log_w > np.log(tis_cap))) if (
          tis_cap is not None and log_w.size) else 0.0,
      "routing_disagreement": routing,
      "routing_disagreement_mean": float(np.mean(routing)) if routing else 0.0,
      "first_order_error_mean": float(error_B[has_tokens_B].mean()) if has_tokens_B.any() else 0.0,
      "first_order_error_max": float(error_B[has_tokens_B].max()) if has_tokens_B.any() else 0.0,
  }


def _rollouts(sampler_params, batches, key, *, sampler_cfg, pi_old, s, mesh, samples):
  """Samples every prompt batch and scores it with the trainer; host arrays, all batches
  concatenated along rows (padding rows of the held-out set masked out)."""
  parts = []
  for i, prompts in enumerate(batches):
    r = rollout_lib.sample(sampler_params, prompts, jax.random.fold_in(key, i),
                           group_size=samples, model_cfg=s.model, sampler_cfg=sampler_cfg,
                           mesh=mesh)
    forward = pi_old(r)
    old_logp, live = forward.logp, forward.live_routing
    valid_B1 = np.repeat(np.asarray(prompts["valid"], bool), samples)[:, None]
    parts.append({
        "old_logp": np.asarray(old_logp), "mu_logp": np.asarray(r.mu_logp),
        "loss_mask": np.asarray(r.completion_mask) * valid_B1,
        "attn_mask": np.asarray(r.attn_mask) & valid_B1,
        "routing_mu": np.asarray(r.routing_mu), "live_routing": np.asarray(live)})
  return {k: np.concatenate([p[k] for p in parts], axis=1 if "routing" in k else 0)
          for k in parts[0]}


def measure(params, batches, key, *, levels, s, mesh, samples: int) -> dict[str, dict]:
  """The gap of each sampler level to the trainer on the same prompts and sampling keys.

  Args:
    params: the trainer's params (a checkpoint's).
    batches: held-out prompt batches (`RunData.eval_batches`), a list.
    key: sampling key; batch i samples with fold_in(key, i) at every level.
    levels: "dtype[:activation_dtype]" specs (`zero` is always measured, first); every
      other sampler option (kv_cache_dtype, quantize_embeddings, int4_group_size,
      temperature, ...) comes from `s.sampler`.
    s: the run's settings (model, sampler, objective.tis_cap, rl.routing_replay).
    mesh: the run's mesh (one process).
    samples: responses per prompt.

  Returns:
    {level: `metrics(...)`}, `zero` first: the float32 sampler's tokens with mu := pi_old
    and routing_mu := the trainer's own routing (float32 is sampled for it if not listed).
  """
  axes = transformer.param_axes(s.model)
  pi_old = functools.partial(sharding.on_mesh(mesh, jax.jit(functools.partial(
      step_lib.pi_old_forward, replay=step_lib.RoutingReplay(s.rl.routing_replay),
      model_cfg=s.model))), params)
  levels = [level for level in dict.fromkeys(levels) if level != gap_levels.ZERO]
  specs = list(dict.fromkeys(["float32", *levels]))
  results, arrays = {}, {}
  for level in specs:
    dtype, activations = parse_level(level)
    scfg = dataclasses.replace(s.sampler, dtype=dtype, activation_dtype=activations)
    arrays[level] = _rollouts(quantize.for_sampler(params, scfg, axes), batches, key,
                              sampler_cfg=scfg, pi_old=pi_old, s=s, mesh=mesh,
                              samples=samples)
  ref = arrays["float32"]
  zero = {**ref, "mu_logp": ref["old_logp"], "routing_mu": ref["live_routing"]}
  for level, a in [(gap_levels.ZERO, zero)] + [(lv, arrays[lv]) for lv in levels]:
    results[level] = metrics(**a, tis_cap=s.objective.tis_cap)
  return results


def table(results: dict[str, dict]) -> str:
  """The levels as an aligned text table, one row each."""
  head = ["level", "tokens"] + [title for _, title, _ in _COLUMNS] + ["route dis/layer"]
  rows = [head]
  for level, m in results.items():
    rows.append([level, str(m["tokens"])] + [format(m[k], f) for k, _, f in _COLUMNS]
                + [" ".join(f"{x:.3f}" for x in m["routing_disagreement"])])
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths))) for r in rows)
