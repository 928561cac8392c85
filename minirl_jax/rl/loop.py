"""The main job: cold-start SFT, then synchronous RL (PAPER.md "Training loop").

One RL step: sample B prompts x G responses with the sampler (mu_logp, routing_mu) -> score
-> advantages -> pi_old by the trainer (routing_old for R2; replays routing_mu under R3) ->
N mini-batch updates -> re-quantise for the sampler. Every step's metrics go to
DIR/metrics.jsonl and TensorBoard; orbax checkpoints make a rerun resume where it stopped.
"""
import dataclasses
import functools
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from minirl_jax import batch as batch_lib
from minirl_jax import checkpoint
from minirl_jax import metrics as metrics_lib
from minirl_jax import objectives
from minirl_jax import sharding
from minirl_jax.models import hf
from minirl_jax.models import transformer
from minirl_jax.rl import checkpointing
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_step
from minirl_jax.sampling import quantize as quantize_lib


@dataclasses.dataclass
class Engines:
  """The compiled functions of one run, closed over its configs and shardings."""
  sft_step: callable
  rl_step: callable
  old_policy: callable
  grad_cosine: callable
  quantize: callable


def _engines(s: settings_lib.Settings, mesh, state_sharding) -> Engines:
  sft_opt, rl_opt = train_step.make_optimizer(s.sft_optim()), train_step.make_optimizer(
      s.rl_optim())
  step_kw = dict(out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  return Engines(
      sft_step=jax.jit(functools.partial(train_step.sft_step, model_cfg=s.model,
                                         optimizer=sft_opt), **step_kw),
      rl_step=jax.jit(functools.partial(train_step.rl_step, model_cfg=s.model,
                                        obj_cfg=s.objective, optimizer=rl_opt), **step_kw),
      old_policy=jax.jit(functools.partial(train_step.old_policy, model_cfg=s.model)),
      grad_cosine=jax.jit(functools.partial(train_step.grad_cosine_token_seq,
                                            model_cfg=s.model, obj_cfg=s.objective)),
      quantize=lambda params: quantize_lib.quantize(params, s.sampler.dtype))


def _init_state(s, mesh, optimizer, key, init_from=None):
  """Creates params (random, or read from `init_from`) and optimizer state in place."""
  def init(key):
    return train_step.init_state(transformer.init_params(s.model, key), optimizer)
  abstract = jax.eval_shape(init, key)
  shardings = state_shardings(s, mesh, abstract)
  if not init_from:
    return jax.jit(init, out_shardings=shardings)(key), shardings
  _check_same_model(hf.read_model_config(init_from), s.model, init_from)
  params = checkpoint.restore_params(
      os.path.join(init_from, "params"),
      checkpoint.abstract_like(abstract.params, shardings.params))
  state = jax.jit(lambda p: train_step.init_state(p, optimizer),
                  out_shardings=shardings)(params)
  return state, shardings


_ARCHITECTURE = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "num_experts", "top_k", "expert_ffn_dim", "dense_ffn_dim",
                 "moe_layers_skip", "norm_topk_prob", "rope_theta", "tie_embeddings")


def _check_same_model(saved, wanted, where):
  for field in _ARCHITECTURE:
    if getattr(saved, field) != getattr(wanted, field):
      raise ValueError(f"model.{field} ({getattr(wanted, field)!r}) differs from the "
                       f"checkpoint's ({getattr(saved, field)!r}) in init_from={where}")


def state_shardings(s, mesh, abstract_state):
  """Params by logical axes; optimizer moments like their params; the rest replicated."""
  param_sh = sharding.tree_shardings(abstract_state.params, transformer.param_axes(s.model),
                                     mesh)
  opt_sh = sharding.like_params(abstract_state.opt_state, abstract_state.params, param_sh,
                                mesh)
  return train_step.TrainState(step=sharding.replicated(mesh), params=param_sh,
                               opt_state=opt_sh)


def _mean_metrics(metric_dicts):
  """Averages per-mini-batch metrics; `*_max` keys take the max."""
  out = {}
  for key in metric_dicts[0]:
    values = np.array([m[key] for m in metric_dicts])
    out[key] = float(values.max() if key.endswith("_max") else values.mean())
  return out


class Run:
  """One experiment in one workdir: build, resume, SFT, RL, plots."""

  def __init__(self, config, workdir: str):
    self.workdir = workdir
    self.data = rl_data.build(config)  # validates data before anything compiles
    self.s = settings_lib.from_config(config, self.data.tokenizer)
    self.mesh = sharding.make_mesh(self.s.mesh)
    multiple = sharding.batch_size_multiple(self.mesh)
    eval_batch = lambda size: min(rl_data.EVAL_BATCH, size, len(self.data.eval_records))
    for field, value in (("rl.mini_batch_size", self.s.rl.mini_batch_size),
                         ("sft.batch_size", self.s.sft.batch_size),
                         ("data.eval_size", eval_batch(self.s.data.eval_size)),
                         ("sft.eval_size", eval_batch(self.s.sft.eval_size))):
      if value % multiple:
        raise ValueError(f"{field} ({value}) must be a multiple of the data-parallel size "
                         f"({multiple} = mesh data x fsdp)")
    self.key = jax.random.key(self.s.seed)
    rl_opt = train_step.make_optimizer(self.s.rl_optim())
    self.state, self.state_sharding = _init_state(self.s, self.mesh, rl_opt,
                                                  jax.random.fold_in(self.key, 0),
                                                  config.init_from)
    self.engines = _engines(self.s, self.mesh, self.state_sharding)
    self.sft_iter = self.data.sft_iterator(self.s)
    self.rl_iter = self.data.rl_iterator(self.s)
    self.progress = checkpointing.Progress()
    self.ckpt = checkpointing.Manager(os.path.join(workdir, "checkpoints"), self.s.checkpoint)
    self.writer: Optional[metrics_lib.MetricWriter] = None

  # --- stages ------------------------------------------------------------------------------

  def run(self) -> dict:
    if self.restore():
      print(f"Resumed from {self.ckpt.directory}: {self.progress}")
    lead = jax.process_index() == 0  # one process writes the shared metrics and plots
    if lead:
      metrics_lib.keep_only(os.path.join(self.workdir, "metrics.jsonl"), self._logged_before)
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=lead)
    try:
      if not self.progress.sft_done:
        self._sft()
      summary = self._rl()
    finally:
      self.close()
    if self.s.log.plots and lead:
      summary["plots"] = metrics_lib.plot(self.writer.path, self.workdir)
    return summary

  def close(self):
    """Waits for checkpoint writes and stops the reward workers."""
    self.ckpt.close()
    if self.writer is not None:
      self.writer.close()
    self.data.close()

  def progress_dict(self) -> dict:
    return dataclasses.asdict(self.progress)

  def _logged_before(self, record) -> bool:
    """Whether a metrics record precedes the restored checkpoint (else it is redone)."""
    if record["stage"] == "sft":
      return record["step"] <= self.progress.sft_step
    return 0 < self.progress.rl_step and record["step"] <= self.progress.rl_step

  def _evaluate(self, size, key, samples=1) -> dict[str, float]:
    """Held-out sampled accuracy (avg@1 unless `samples` > 1)."""
    params = self.engines.quantize(self.state.params)
    return self.data.evaluate(params, size=size, key=key, s=self.s, mesh=self.mesh,
                              samples=samples)

  def restore(self) -> bool:
    """Loads the latest checkpoint of the workdir, if any."""
    restored = self.ckpt.restore_latest(self.state, self.sft_iter, self.rl_iter)
    if restored is not None:
      self.state, self.progress = restored
    return restored is not None

  def evaluate(self, samples: int, size: int, seed: int) -> dict[str, float]:
    """avg@k and pass@k of the current params on the held-out split."""
    return self._evaluate(size, jax.random.key(seed), samples)

  def _sft(self):
    cfg = self.s.sft
    bar = self._bar(cfg.max_steps, self.progress.sft_step, "sft")
    while self.progress.sft_step < cfg.max_steps:
      start = time.perf_counter()
      batch = sharding.shard_batch(next(self.sft_iter), self.mesh)
      self.state, m = self.engines.sft_step(self.state, batch)
      self.progress.sft_step += 1
      step = self.progress.sft_step
      m = metrics_lib.to_python(m)
      m["time/step_s"] = time.perf_counter() - start
      if step % cfg.eval_every == 0 or step == cfg.max_steps:
        m["eval/accuracy"] = self._evaluate(cfg.eval_size,
                                            jax.random.fold_in(self.key, step))["avg@1"]
        if m["eval/accuracy"] >= cfg.target_accuracy:
          self.progress.sft_done = True
      self.writer.write(step, "sft", m)
      self._advance(bar, m, ("sft/loss", "eval/accuracy"))
      if self.progress.sft_done:
        break
      if step % self.s.checkpoint.every == 0 and step < cfg.max_steps:
        self.ckpt.save(self.progress, self.state, self.sft_iter, self.rl_iter)
    self.progress.sft_done = True
    bar.close()
    # RL starts with a fresh optimizer from the cold-start weights.
    rl_opt = train_step.make_optimizer(self.s.rl_optim())
    self.state = jax.jit(lambda p: train_step.init_state(p, rl_opt),
                         out_shardings=self.state_sharding)(self.state.params)
    self.ckpt.save(self.progress, self.state, self.sft_iter, self.rl_iter, force=True)

  def _rl(self) -> dict:
    cfg = self.s.rl
    eval_key = jax.random.fold_in(self.key, 1)
    if self.progress.rl_step == 0:
      acc = self._evaluate(self.s.data.eval_size, eval_key)["avg@1"]
      self.writer.write(0, "rl", {"eval/accuracy": acc})
      self.progress.start_accuracy = acc
    sampler_params = self.engines.quantize(self.state.params)
    bar = self._bar(cfg.steps, self.progress.rl_step, "rl")
    acc = None
    while self.progress.rl_step < cfg.steps:
      step = self.progress.rl_step + 1
      m, sampler_params = self._rl_step(step, sampler_params)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        acc = self._evaluate(self.s.data.eval_size, eval_key)["avg@1"]
        m["eval/accuracy"] = acc
      self.progress.rl_step = step
      self.writer.write(step, "rl", m)
      self._advance(bar, m, ("reward/mean", "eval/accuracy", "policy/entropy",
                             "mismatch/kl_mu_pi_old"))
      if step % self.s.checkpoint.every == 0 or step == cfg.steps:
        self.ckpt.save(self.progress, self.state, self.sft_iter, self.rl_iter)
    bar.close()
    if acc is None:
      acc = self._evaluate(self.s.data.eval_size, eval_key)["avg@1"]
    return {"sft_steps": self.progress.sft_step, "rl_steps": self.progress.rl_step,
            "accuracy_after_sft": self.progress.start_accuracy, "accuracy_after_rl": acc,
            "metrics": self.writer.path}

  def _rl_step(self, step, sampler_params):
    """Sample -> score -> advantages -> pi_old -> N mini-batch updates -> re-quantise."""
    s, cfg = self.s, self.s.rl
    times = [time.perf_counter()]
    prompts = next(self.rl_iter)
    rollout = jax.block_until_ready(self.data.sample(
        sampler_params, prompts, jax.random.fold_in(self.key, 1000 + step), s, self.mesh))
    times.append(time.perf_counter())
    rewards, m = self.data.score(rollout, prompts, s, self.mesh)
    times.append(time.perf_counter())
    full, live_topk = self._scored_batch(rollout, rewards)
    m.update(_rollout_metrics(rollout, rewards, full, live_topk))
    times.append(time.perf_counter())
    perm = np.random.default_rng([s.seed, step]).permutation(cfg.global_batch)
    mb_metrics = []
    for i in range(cfg.num_minibatches):
      mb = sharding.shard_batch(
          _minibatch(full, perm[i * cfg.mini_batch_size:(i + 1) * cfg.mini_batch_size]),
          self.mesh)
      if i == 0 and s.objective.grad_cosine_every and step % s.objective.grad_cosine_every == 0:
        m["is/grad_cosine_token_seq"] = self.engines.grad_cosine(self.state.params, mb)
      self.state, mb_m = self.engines.rl_step(self.state, mb)
      mb_metrics.append(mb_m)
    m.update(_mean_metrics([metrics_lib.to_python(x) for x in mb_metrics]))
    sampler_params = jax.block_until_ready(self.engines.quantize(self.state.params))
    times.append(time.perf_counter())
    m = metrics_lib.to_python(m)
    sample_s, score_s, old_s, train_s = np.diff(times)
    m.update({"time/sample_s": sample_s, "time/score_s": score_s, "time/old_logp_s": old_s,
              "time/train_s": train_s, "time/step_s": times[-1] - times[0],
              "throughput/tok_s": m["rollout/tokens"] / (times[-1] - times[0])})
    return m, sampler_params

  def _scored_batch(self, rollout, rewards):
    """The global TrainBatch: advantages, pi_old (and its routing) and what to replay."""
    cfg = self.s.rl
    advantages = objectives.group_advantages(rewards, cfg.group_size,
                                             self.s.objective.use_normalize_std)
    replay_old = rollout.routing_mu if cfg.routing_replay == "r3" else None
    old_logp, routing_old, live_topk = jax.block_until_ready(self.engines.old_policy(
        self.state.params, rollout.tokens, rollout.attn_mask, replay_old))
    replay = {"none": None, "r2": routing_old, "r3": rollout.routing_mu}[cfg.routing_replay]
    full = batch_lib.TrainBatch(
        tokens=rollout.tokens, attn_mask=rollout.attn_mask, loss_mask=rollout.completion_mask,
        advantages=advantages, old_logp=old_logp, mu_logp=rollout.mu_logp,
        num_sequences=jnp.float32(cfg.global_batch),
        num_tokens=jnp.maximum(jnp.sum(rollout.completion_mask), 1.0), routing=replay)
    return full, live_topk

  # --- progress display ----------------------------------------------------------------------

  def _bar(self, total, initial, stage):
    return tqdm.tqdm(total=total, initial=initial, desc=stage, dynamic_ncols=True,
                     disable=not self.s.log.progress, mininterval=1.0)

  def _advance(self, bar, m, keys):
    bar.set_postfix({_LABELS[k]: f"{m[k]:.3g}" for k in keys if k in m}, refresh=False)
    bar.update(1)


_LABELS = {"sft/loss": "loss", "eval/accuracy": "acc", "reward/mean": "reward",
           "policy/entropy": "entropy", "mismatch/kl_mu_pi_old": "kl"}


# Jitted: one dispatch instead of dozens of small eager ops on global arrays per step, which
# on multi-process XLA:CPU could fill a device's in-flight queue and deadlock a collective.
@jax.jit
def _minibatch(full: batch_lib.TrainBatch, rows: jax.Array) -> batch_lib.TrainBatch:
  """Rows `rows` of the global batch, normalised by the mini-batch's GLOBAL counts."""
  take = lambda x: jnp.asarray(x)[rows]
  mb = batch_lib.TrainBatch(
      tokens=take(full.tokens), attn_mask=take(full.attn_mask), loss_mask=take(full.loss_mask),
      advantages=take(full.advantages), old_logp=take(full.old_logp),
      mu_logp=take(full.mu_logp), num_sequences=jnp.float32(len(rows)),
      num_tokens=jnp.float32(0),
      routing=None if full.routing is None else jnp.asarray(full.routing)[:, rows])
  return mb.replace(num_tokens=jnp.maximum(jnp.sum(mb.loss_mask), 1.0))


@jax.jit
def _rollout_metrics(rollout, rewards, full, live_topk):
  """What the paper tracks per step, computed once on the whole global batch."""
  m = dict(objectives.diagnostics.mismatch_metrics(full))
  m["reward/mean"] = jnp.mean(rewards)
  m["reward/std"] = jnp.std(rewards)
  m["rollout/tokens"] = jnp.sum(rollout.completion_mask)
  m["rollout/length_mean"] = jnp.mean(jnp.sum(rollout.completion_mask, axis=1))
  m["moe/routing_disagreement"] = routing_disagreement(rollout.routing_mu, live_topk,
                                                       rollout.attn_mask)
  return m


def routing_disagreement(routing_a, routing_b, valid_BT):
  """Fraction of (layer, token) top-k expert SETS that differ; -1 entries are skipped."""
  if routing_a.shape[0] == 0:
    return jnp.float32(0.0)
  a = jnp.sort(routing_a.astype(jnp.int32), axis=-1)
  b = jnp.sort(routing_b.astype(jnp.int32), axis=-1)
  counted = (routing_a[..., 0] >= 0) & (routing_b[..., 0] >= 0) & valid_BT[None]
  differ = jnp.any(a != b, axis=-1) & counted
  return jnp.sum(differ) / jnp.maximum(jnp.sum(counted), 1)
