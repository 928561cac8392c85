"""The paper's first-order approximation, measured: each objective's gradient estimator
against the true policy gradient, chunk by chunk (docs/results/round3.md).

A chunk is one global batch: `rl.prompts_per_step` prompts x `rl.group_size` responses. For
chunk c the true gradient's estimate g*_c comes from on-policy samples of the float32
sampler with mu := pi_old (the zero-gap control), so that its estimator is J_seq's gradient
with weights exactly 1: mean_i A_i grad log pi_theta(y_i). Each estimator's g_e,c comes from
the same prompts sampled by the sampler under study. Every vector points uphill (the
objective's gradient, not the loss's); the MoE aux loss is left out. `experiments.round3`
reads the chunks' inner products (a Gram matrix), never the vectors themselves.
"""
import dataclasses
import functools
import itertools
import json
import os
import time
from typing import Callable, Optional

from absl import logging

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax import sharding
from minirl_jax.objectives import config as obj_config
from minirl_jax.experiments import round3
from minirl_jax.rl import checkpointing
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import losses
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import step as step_lib
from minirl_jax.rl import wiring

TRUE = round3.TRUE  # the true gradient's set of chunk vectors

# Each estimator: (the objective's overrides, or None for J_seq of Eq. 1).
ESTIMATORS = {
    "minirl": {"name": "minirl"},
    "minirl_no_is": {"name": "minirl", "train_infer_is": False},
    "seq_is": None,
    "seq_tis": {"name": "minirl", "is_level": "sequence"},
    "grpo": {"name": "grpo"},
    "cispo": {"name": "cispo"},
}


@dataclasses.dataclass(frozen=True)
class Estimator:
  name: str
  loss_fn: Callable  # (logp_BT, batch, cfg) -> (loss, metrics)
  cfg: objectives.ObjectiveConfig


def estimators(base: objectives.ObjectiveConfig, names=tuple(ESTIMATORS)) -> list[Estimator]:
  """The estimators by name, each from `base` (tis_cap, eps) with its own switches."""
  out = []
  for name in names:
    overrides = ESTIMATORS[name]
    if overrides is None:
      out.append(Estimator(name, objectives.sequence_loss, base))
      continue
    cfg = dataclasses.replace(base, **{
        "train_infer_is": None, "length_norm": None, "normalize_std": None,
        "is_level": obj_config.ISLevel.TOKEN, **overrides})
    out.append(Estimator(name, objectives.OBJECTIVES[cfg.name], cfg))
  return out


def flat_norm_scale(vectors_ED: jax.Array):
  """(vectors / their max |entry|, that scale): inner products of J_seq's gradients can
  leave float32's range; the Gram matrix restores the scale in float64."""
  scale_E = jnp.max(jnp.abs(vectors_ED), axis=1)
  safe_E = jnp.where(scale_E > 0, scale_E, 1.0)
  return vectors_ED / safe_E[:, None], scale_E


def gradients(params, batch: batch_lib.TrainBatch, rewards_N: jax.Array, *,
              model_cfg, group_size: int, ests: tuple[Estimator, ...]):
  """Every estimator's uphill gradient on one chunk, flattened: [E, D] float32.

  One forward (pi_theta's log-probs, replaying `batch.routing` if set), then one
  backward per estimator; each estimator takes its own advantages (z-scored for GRPO and
  CISPO, group-centred otherwise) from the chunk's rewards.
  """
  logp_fn = lambda p: losses.policy_logp(p, batch, model_cfg)[0]
  logp_BT, vjp = jax.vjp(logp_fn, params)
  rows = []
  for est in ests:
    adv = objectives.group_advantages(rewards_N, group_size, est.cfg.use_normalize_std,
                                      est.cfg.std_ddof)
    b = batch.replace(advantages=adv)
    cotangent = jax.grad(lambda lp: -est.loss_fn(lp, b, est.cfg)[0])(logp_BT)
    rows.append(ravel_pytree(vjp(cotangent)[0])[0].astype(jnp.float32))
  return flat_norm_scale(jnp.stack(rows))


@dataclasses.dataclass
class Chunk:
  """One chunk's gradients (scaled rows, scales) and what was measured on its rollout."""
  vectors: np.ndarray  # [E, D] float32, each row divided by its scale
  scales: np.ndarray   # [E] float64
  stats: dict


def chunk_stats(rewards, metrics) -> dict:
  """Host floats of a chunk: reward, lengths and the gap (pi_old's metrics)."""
  keep = ("mismatch/kl_k3", "mismatch/kl_mu_pi_old", "moe/routing_disagreement",
          "rollout/length_mean")
  out = {k: float(v) for k, v in jax.device_get(metrics).items() if k in keep}
  out["reward/mean"] = float(jnp.mean(rewards))
  return out


def measure_chunk(steps, sampler_params, prompts: dict, key, *, old_params, params, ests,
                  grad_fn) -> Chunk:
  """Samples one chunk with `sampler_params` (the run's sampler format of `old_params`,
  the behaviour policy's weights), scores it, forms pi_old on `old_params` (mu := pi_old
  where `objective.behaviour_logp` says so: the zero gap) and the estimators' gradients at
  `params` (pi_theta: `old_params` itself at staleness 0)."""
  rollout = steps.sample(sampler_params, prompts, key)
  rewards, _ = steps.score(rollout, prompts, count_errors=False)
  advantages, _ = steps.advantages(rewards)
  batch, metrics = steps.pi_old(old_params, rollout, advantages)
  vectors, scales = jax.device_get(grad_fn(params, batch, rewards, ests=tuple(ests)))
  return Chunk(np.asarray(vectors), np.asarray(scales, np.float64),
               chunk_stats(rewards, metrics))


def grad_program(s) -> Callable:
  """`gradients` jitted for the run's model and group size (estimators static)."""
  return jax.jit(functools.partial(gradients, model_cfg=s.model, group_size=s.rl.group_size),
                 static_argnames=("ests",))


def stale_params(steps, state, prompts: dict, key, *, k: int):
  """The policy after k of one RL step's N mini-batch updates: one global batch sampled
  by the run's sampler at `state.params`, pi_old there, then the first k mini-batches'
  updates with the run's optimizer and its state. Returns (params after k updates, N)."""
  s = steps.s
  rollout = steps.sample(steps.quantize(state.params), prompts, key)
  rewards, _ = steps.score(rollout, prompts, count_errors=False)
  advantages, _ = steps.advantages(rewards)
  batch, _ = steps.pi_old(state.params, rollout, advantages)
  rows = step_lib.minibatch_rows(s.seed, 0, batch.tokens.shape[0], s.rl.mini_batch_size)
  state = jax.tree.map(jnp.copy, state)  # the update donates its state
  for mb_rows in rows[:k]:
    state, _ = steps.programs.rl_step(state, step_lib.minibatch(batch, mb_rows))
  return state.params, len(rows)


class Rows:
  """Chunk vectors written into one preallocated [rows, D] float32 matrix (no copy of the
  vectors is ever made), each with its scale (`flat_norm_scale`)."""

  def __init__(self, rows: int, dim: int):
    self.u = np.zeros((rows, dim), np.float32)
    self.scale = np.zeros(rows, np.float64)

  def put(self, row: int, vector: np.ndarray, scale: float):
    self.u[row], self.scale[row] = vector, scale

  def gram(self, other: Optional["Rows"] = None) -> np.ndarray:
    """K_ij = s_i s'_j <u_i, u'_j> in float64 (`other` = self by default)."""
    other = self if other is None else other
    inner = np.asarray(self.u @ other.u.T, np.float64)
    return inner * self.scale[:, None] * other.scale[None, :]


# ---------------------------------------------------------------------------------------
# The grid's driver: points grouped by the true gradient they share.

# Where each checkpoint lives under the workdir: (run dir, RL step; None = its newest).
CHECKPOINT_DIRS = {"cold": ("coldstart", None), "rl50": ("minirl_seed0", 50),
                   "rl150": ("minirl_seed0", 150)}
_TRUE_KEY, _ESTIMATOR_KEY, _STALE_KEY = 1, 2, 3


def settings_for(config, point: round3.Point, noise: float = 0.0):
  """The run's settings at a point: a float32 trainer (the true gradient's policy), the
  length level's chain steps, the gap's sampler format (zero: the float32 sampler with
  mu := pi_old) and its routing replay."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.compute_dtype = "float32"
    config.data.min_steps, config.data.max_steps = round3.LENGTHS[point.length]
    zero = point.gap == "zero"
    config.sampler.dtype = "float32" if zero else point.gap.split("+")[0]
    config.sampler.logit_noise = noise if point.gap.endswith("+noise") else 0.0
    config.objective.behaviour_logp = "pi_old" if zero else "processed"
    config.rl.routing_replay = point.replay
  return settings_lib.from_config(config)


def truth_point(point: round3.Point) -> round3.Point:
  """The point whose settings measure the true gradient: the zero gap, no replay."""
  return dataclasses.replace(point, gap="zero", replay="none")


def path(out: str, point: round3.Point, ext: str) -> str:
  return os.path.join(out, point.name.replace("/", "__") + ext)


@dataclasses.dataclass
class Group:
  """What the points sharing one true gradient share."""
  mesh: object
  old_params: object  # theta_old: the weights every sampler under study quantises
  params: object      # pi_theta: after `staleness` updates
  prompts: list       # one prompt batch per chunk (the estimators use the first ones)
  truth: Rows         # the true gradient's chunk vectors, one per prompt chunk
  truth_gram: np.ndarray
  truth_stats: list
  updates: int        # N mini-batches of the stale step (0 at staleness 0)


def _bind(s, mesh):
  data = rl_data.build(s)
  return wiring.bind(s, mesh, data.tokenizer, data.reward_fn), data


def _truth_cache(out: str, point: round3.Point, chunks: int) -> str:
  return os.path.join(out, "truth", point.truth_key.replace("/", "__") + f"_{chunks}.npz")


def group(config, workdir: str, point: round3.Point, truth_chunks: int,
          out: Optional[str] = None) -> Group:
  """Loads the checkpoint, makes the stale policy, and measures the true gradient (read
  back from `out`'s cache when an earlier call measured it: a session that ends mid-group
  resumes without measuring it again)."""
  s = settings_for(config, truth_point(point))
  mesh = sharding.make_mesh(s.mesh)
  run_dir, rl_step = CHECKPOINT_DIRS[point.checkpoint]
  state, _ = checkpointing.read_latest(os.path.join(workdir, run_dir), s, mesh, rl_step)
  steps, data = _bind(s, mesh)
  prompts = list(itertools.islice(data.rl_iterator(s), truth_chunks))
  params, updates = state.params, 0
  if point.staleness:
    base = settings_for(config, dataclasses.replace(point, gap=round3.BASE["gap"]))
    stale_steps, _ = _bind(base, mesh)
    stale_prompts = next(data.rl_iterator(dataclasses.replace(s, seed=s.seed + 7919)))
    params, updates = stale_params(stale_steps, state, stale_prompts,
                                   jax.random.key(_STALE_KEY), k=point.staleness)
    stale_steps.close()
  cache = _truth_cache(out, point, truth_chunks) if out else None
  if cache and os.path.exists(cache):
    with np.load(cache) as f:
      truth = Rows(0, 0)
      truth.u, truth.scale = f["u"], f["scale"]
      stats = json.loads(str(f["stats"]))
    steps.close()
    return Group(mesh, state.params, params, prompts, truth, truth.gram(), stats, updates)
  grad_fn = grad_program(s)
  est = tuple(estimators(s.objective, ("seq_is",)))
  sampler_params = steps.quantize(params)
  truth, stats = None, []
  for c, batch in enumerate(prompts):
    chunk = measure_chunk(steps, sampler_params, batch,
                          jax.random.fold_in(jax.random.key(_TRUE_KEY), c),
                          old_params=params, params=params, ests=est, grad_fn=grad_fn)
    if truth is None:
      truth = Rows(len(prompts), chunk.vectors.shape[1])
    truth.put(c, chunk.vectors[0], chunk.scales[0])
    stats.append(chunk.stats)
    if (c + 1) % 16 == 0:
      logging.info("true gradient of %s: %d of %d chunks", point.truth_key, c + 1,
                   len(prompts))
  steps.close()
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache + ".tmp.npz", u=truth.u, scale=truth.scale, stats=json.dumps(stats))
    os.replace(cache + ".tmp.npz", cache)
  return Group(mesh, state.params, params, prompts, truth, truth.gram(), stats, updates)


def measure_point(config, point: round3.Point, g: Group, chunks: int,
                  noise: float = 0.0) -> tuple[round3.Gram, list]:
  """(the Gram matrix of the true gradient's chunks and each estimator's on the first
  `chunks` prompt chunks, per-chunk stats)."""
  s = settings_for(config, point, noise)
  steps, _ = _bind(s, g.mesh)
  ests = tuple(estimators(s.objective))
  grad_fn = grad_program(s)
  sampler_params = steps.quantize(g.old_params)
  rows, stats = Rows(len(ests) * chunks, g.truth.u.shape[1]), []
  for c, batch in enumerate(g.prompts[:chunks]):
    chunk = measure_chunk(steps, sampler_params, batch,
                          jax.random.fold_in(jax.random.key(_ESTIMATOR_KEY), c),
                          old_params=g.old_params, params=g.params, ests=ests,
                          grad_fn=grad_fn)
    for e in range(len(ests)):
      rows.put(e * chunks + c, chunk.vectors[e], chunk.scales[e])
    stats.append(chunk.stats)
    if (c + 1) % 16 == 0:
      logging.info("%s: %d of %d chunks", point.name, c + 1, chunks)
  steps.close()
  t = len(g.prompts)
  K = np.block([[g.truth_gram, rows.gram(g.truth).T], [rows.gram(g.truth), rows.gram()]])
  sets = np.array([TRUE] * t + [e.name for e in ests for _ in range(chunks)])
  prompts = np.concatenate([np.arange(t), np.tile(np.arange(chunks), len(ests))])
  return round3.Gram(K, sets, prompts), stats


NOISE_LADDER = (0.25, 0.5, 1.0, 2.0, 4.0)
NOISE_KL_RATIO = 4.0  # int4 + noise: its k3 KL this many times int4's (round3.md part 1)


def _kl_k3(config, point, g: Group, noise: float, chunks: int) -> float:
  s = settings_for(config, point, noise)
  steps, _ = _bind(s, g.mesh)
  sampler_params = steps.quantize(g.old_params)
  kls = []
  for c, batch in enumerate(g.prompts[:chunks]):
    rollout = steps.sample(sampler_params, batch,
                           jax.random.fold_in(jax.random.key(_ESTIMATOR_KEY), c))
    rewards, _ = steps.score(rollout, batch, count_errors=False)
    _, metrics = steps.pi_old(g.old_params, rollout, steps.advantages(rewards)[0])
    kls.append(float(metrics["mismatch/kl_k3"]))
  steps.close()
  return float(np.mean(kls))


def calibrate_noise(config, point: round3.Point, g: Group, chunks: int = 2) -> dict:
  """The logit noise whose k3 KL is NOISE_KL_RATIO x int4's on the group's first chunks:
  int4's KL, then the ladder's, interpolated in log-log between the two rungs that bracket
  the target (the widest rung if none does)."""
  int4 = _kl_k3(config, dataclasses.replace(point, gap="int4"), g, 0.0, chunks)
  target = NOISE_KL_RATIO * int4
  ladder = [(n, _kl_k3(config, point, g, n, chunks)) for n in NOISE_LADDER]
  noise = ladder[-1][0]
  for (n0, k0), (n1, k1) in zip(ladder, ladder[1:]):
    if k0 <= target <= k1:
      frac = (np.log(target) - np.log(k0)) / (np.log(k1) - np.log(k0))
      noise = float(np.exp(np.log(n0) + frac * (np.log(n1) - np.log(n0))))
      break
  return {"noise": noise, "int4_kl_k3": int4, "target_kl_k3": target,
          "ladder": [[n, k] for n, k in ladder]}


def run(config, workdir: str, points: list, chunks: int, truth_chunks: int, out: str) -> dict:
  """Measures every point not yet written, group by group (resumable): each group's true
  gradient on `truth_chunks` prompt chunks, each point's estimators on the first
  `chunks`."""
  done = []
  groups = {}
  for point in points:  # in the grid's order, base group first
    groups.setdefault(point.truth_key, []).append(point)
  for members in groups.values():
    # A point is finished once its .json (written last, after the .npz) exists.
    todo = [p for p in members if not os.path.exists(path(out, p, ".json"))]
    if not todo:
      continue
    start = time.time()
    g = group(config, workdir, todo[0], truth_chunks, out)
    logging.info("true gradient of %s: %.0f s", todo[0].truth_key, time.time() - start)
    for point in todo:
      start = time.time()
      noise = _noise(config, point, g, out)
      gram, stats = measure_point(config, point, g, chunks, noise)
      np.savez_compressed(path(out, point, ".tmp.npz"), gram=gram.K, sets=gram.sets,
                          prompts=gram.prompts)
      os.replace(path(out, point, ".tmp.npz"), path(out, point, ".npz"))
      summary = {"point": point.name, **dataclasses.asdict(point), "chunks": chunks,
                 "truth_chunks": truth_chunks, "logit_noise": noise,
                 "responses_per_chunk": len(g.prompts[0]["prompt"]) * config.rl.group_size,
                 "updates": g.updates, "seconds": round(time.time() - start, 1),
                 "truth_chunk_stats": g.truth_stats, "chunk_stats": stats,
                 "stats": round3.summarise(gram)}
      with open(path(out, point, ".tmp.json"), "w") as f:
        json.dump(summary, f)
      os.replace(path(out, point, ".tmp.json"), path(out, point, ".json"))
      logging.info("%s: %.0f s, minirl cosine %.3f (ceiling %.3f, signal cosine %.3f)",
                   point.name, time.time() - start, summary["stats"]["minirl/cosine"][0],
                   summary["stats"]["minirl/ceiling"][0], summary["stats"]["minirl/ratio"][0])
      done.append(point.name)
  return {"measured": done}


def _noise(config, point: round3.Point, g: Group, out: str) -> float:
  """The logit noise of an int4 + noise point, calibrated once per checkpoint (kept)."""
  if not point.gap.endswith("+noise"):
    return 0.0
  noise_file = os.path.join(out, f"noise_{point.checkpoint}.json")
  if not os.path.exists(noise_file):
    with open(noise_file, "w") as f:
      json.dump(calibrate_noise(config, point, g), f)
  with open(noise_file) as f:
    return json.load(f)["noise"]


def pilot(config, workdir: str, truth_chunks: int) -> dict:
  """The base point's true gradient alone: its split-half cosine and reliability as
  chunks accumulate (nothing about any estimator), to fix the chunk counts."""
  g = group(config, workdir, round3.Point(), truth_chunks)
  out = {}
  for c in sorted({n for n in (4, 8, 16, 32, 64, 128, 256, 512) if n <= truth_chunks}
                  | {truth_chunks}):
    sub = round3.Gram(g.truth_gram[:c, :c], np.array([TRUE] * c), np.arange(c))
    out[c] = {"split_half": round3.split_half(sub, TRUE),
              "reliability": round3.reliability(sub, TRUE, np.ones(c))}
    logging.info("pilot: %d chunks: split half %.3f, reliability %.3f", c,
                 out[c]["split_half"], out[c]["reliability"])
  return {"pilot": out, "truth_chunk_stats": g.truth_stats}
