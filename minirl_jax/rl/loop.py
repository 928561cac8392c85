"""The main job: cold-start SFT, then synchronous RL (PAPER.md "Training loop").

A thin loop over `rl.step`'s calls: SFT updates, RL steps, evaluation, checkpoints, logs.
Every step's metrics go to DIR/metrics.jsonl and TensorBoard; orbax checkpoints make a rerun
resume where it stopped.
"""
import dataclasses
import os
import signal
import time
from typing import Optional

from absl import logging
import jax
import tqdm

from minirl_jax import errors
from minirl_jax import metrics as metrics_lib
from minirl_jax import sharding
from minirl_jax.rl import checkpointing
from minirl_jax import objectives
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import inflight
from minirl_jax.rl import keys as keys_lib
from minirl_jax.rl import placement
from minirl_jax.rl import rollout as rollout_lib
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_state
from minirl_jax.rl import watchers
from minirl_jax.rl import wiring
from minirl_jax.rl import workdir as workdir_lib


class Run:
  """One experiment in one workdir: build, resume, SFT, RL, plots."""

  def __init__(self, s: settings_lib.Settings, workdir: str,
               data: Optional[rl_data.RunData] = None):
    settings_lib.check_trainable(s)
    if s.init_from:
      checkpointing.check_model_dir(s.init_from)
    self.s, self.workdir = s, workdir
    self.data = data or rl_data.build(s)  # validates data before anything compiles
    self.meshes = placement.meshes(s)
    self.mesh = self.meshes.trainer
    _check_batch_sizes(s, self.meshes, len(self.data.eval_records))
    # Held until `close`: another process on the workdir, or a resume with another
    # config, is refused here, before anything compiles or a checkpoint is read.
    self.claim = workdir_lib.claim(workdir, s, lead=jax.process_index() == 0)
    try:
      self._build()
    except BaseException:
      self._release()
      raise

  def _build(self):
    s = self.s
    self.keys = keys_lib.Keys.of(s.seed)
    self.state, self.state_sharding = checkpointing.initial_state(s, self.mesh,
                                                                  self.keys.init)
    self.fns = wiring.bind(s, self.mesh, self.data.tokenizer, self.data.reward_fn,
                           self.state_sharding, sampler_mesh=self.meshes.sampler)
    self.sampler_sharding = (placement.sampler_shardings(
        s, checkpointing.abstract_like(self.state.params), self.meshes.sampler)
        if self.meshes.disaggregated else None)
    self.inflight_dir = os.path.join(self.workdir, "inflight")
    self.rollouts: Optional[inflight.Rollouts] = None
    self.versions = {}  # version -> the trainer's weights (staleness metrics, k > 0)
    self.sft_iter = self.data.sft_iterator(s)
    self.rl_iter = self.data.rl_iterator(s)
    self.progress = checkpointing.Progress()
    self.ckpt = checkpointing.Manager(os.path.join(self.workdir, "checkpoints"), s.checkpoint)
    self.writer: Optional[metrics_lib.MetricWriter] = None
    self.no_signal = watchers.NoSignalWatch(s.rl.no_signal_warn_steps)
    self.collapse = watchers.CollapseStop(s.rl.stop_on_collapse)
    # Each reads every record written, in this order (the guard may stop the run).
    self.watchers = (watchers.SkipGuard(s.optim.max_skipped_in_a_row), self.no_signal,
                     self.collapse)
    self.signals = watchers.StopSignals()

  def run(self) -> dict:
    resumed = self.restore()
    lead = jax.process_index() == 0  # one process writes the shared metrics and plots
    if lead:
      workdir_lib.record(self.workdir, self.s)  # what a later resume is checked against
    kept = metrics_lib.keep_only(os.path.join(self.workdir, "metrics.jsonl"),
                                 self._logged_before) if lead else []
    if resumed:
      logging.info("Resumed from %s: %s", self.ckpt.directory, self.progress)
      for watcher in self.watchers:
        watcher.resume(kept)
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=lead,
                                           wandb_project=self.s.log.wandb_project,
                                           config=workdir_lib.to_json(self.s))
    try:
      with self.signals:
        if not self.progress.sft_done:
          self._sft()
        summary = self._rl()
      if self.s.log.plots:
        summary["plots"] = self.writer.plot(self.workdir)
    finally:
      self.close()
    return summary

  def close(self):
    """Waits for checkpoint writes, stops the reward workers, releases the workdir."""
    try:
      self.ckpt.close()
      if self.writer is not None:
        self.writer.close()
      self.fns.close()
    finally:
      self._release()

  def _release(self):
    if self.claim is not None:
      self.claim.release()

  def restore(self) -> bool:
    """Loads the latest checkpoint of the workdir, if any."""
    restored = self.ckpt.restore_latest(self.state, self.sft_iter, self.rl_iter)
    if restored is not None:
      self.state, self.progress = restored
    return restored is not None

  def publish(self, params):
    """The sampler's weights made from `params`: quantised where they are (the smaller
    tree to move), then placed on the sampler's devices if it has its own."""
    sampler_params = self.fns.quantize(params)
    if self.sampler_sharding is not None:
      sampler_params = placement.to_sampler(sampler_params, self.sampler_sharding)
    return sampler_params

  def evaluate(self, size: int, key, samples: int = 1) -> dict[str, float]:
    """Held-out avg@k and pass@k of the current params (sampler dtype, temperature)."""
    batches = self.data.eval_batches(self.s, size, rollout_lib.EVAL_BATCH)
    return self.fns.evaluate(self.publish(self.state.params), batches, key, samples=samples)

  def _logged_before(self, record) -> bool:
    """Whether a metrics record precedes the restored checkpoint (else it is redone)."""
    if record["stage"] == "sft":
      return record["step"] <= self.progress.sft_step
    return 0 < self.progress.rl_step and record["step"] <= self.progress.rl_step

  # --- SFT ---------------------------------------------------------------------------------

  def _sft(self):
    """Cold start. Step n + 1 is dispatched before step n's metrics are fetched."""
    cfg = self.s.sft
    bar = self._bar(cfg.max_steps, self.progress.sft_step, "sft")
    pending, self._sft_clock = None, time.perf_counter()
    while self.progress.sft_step < cfg.max_steps and not self.progress.sft_done:
      batch = sharding.shard_batch(next(self.sft_iter), self.mesh)
      self.state, metrics = self.fns.sft_update(self.state, batch)
      self.progress.sft_step = step = self.progress.sft_step + 1
      if pending:
        self._log_sft(bar, *pending)
      pending = (step, metrics, {})
      if step % cfg.eval_every == 0 or step == cfg.max_steps:
        acc = self.evaluate(cfg.eval_size, self.keys.sft_eval(step))["avg@1"]
        pending[2]["eval/accuracy"] = acc
        self.progress.sft_done = acc >= cfg.target_accuracy
      if step % self.s.checkpoint.every == 0 and step < cfg.max_steps and (
          not self.progress.sft_done):
        self._log_sft(bar, *pending)
        pending = None
        self._save()
      if self.signals.requested():
        if pending:
          self._log_sft(bar, *pending)
        self._stop_for_signal("sft")
    if pending:
      self._log_sft(bar, *pending)
    self.progress.sft_done = True
    bar.close()
    # RL starts with a fresh optimizer from the cold-start weights.
    self.state = train_state.fresh_optimizer(self.state.params, self.fns.optimizers.rl,
                                             self.state_sharding)
    self._save()

  def _log_sft(self, bar, step, metrics, extra):
    m = {**metrics_lib.to_python(metrics), **extra}
    now = time.perf_counter()
    m["time/step_s"], self._sft_clock = now - self._sft_clock, now
    self._advance(bar, m, ("sft/loss", "eval/accuracy"))
    self._record("sft", step, m)

  def _record(self, stage: str, step: int, m: dict) -> None:
    """Writes a step's metrics; then every watcher reads them (the guard may stop here)."""
    self.writer.write(step, stage, m)
    for watcher in self.watchers:
      watcher.observe(stage, step, m)

  def _save(self):
    self.ckpt.save(self.progress, self.state, self.sft_iter, self.rl_iter)
    if self.rollouts is not None and self.s.rl.max_staleness:
      inflight.save(self.inflight_dir, self.progress.global_step, self.rollouts.pending,
                    self.versions, self.ckpt.steps())

  def _stop_for_signal(self, stage: str):
    """Saves the state after the finished step and stops (the same command resumes)."""
    self._save()  # written by the time the error reaches the script (`run` closes)
    name = signal.Signals(self.signals.received or signal.SIGTERM).name
    step = self.progress.sft_step if stage == "sft" else self.progress.rl_step
    raise errors.RunStopped(
        f"{name} after {stage} step {step}: checkpoint {self.progress.global_step} saved "
        f"under {self.ckpt.directory}; run the same command to resume",
        status=128 + (self.signals.received or signal.SIGTERM))

  # --- RL ----------------------------------------------------------------------------------

  def _rl(self) -> dict:
    cfg = self.s.rl
    eval_key = self.keys.rl_eval
    if self.progress.rl_step == 0:
      m = self._evaluation(eval_key)
      acc = m["eval/accuracy"]
      self._record("rl", 0, {**m, **self._full_evaluation(0, eval_key)})
      self.progress.start_accuracy = acc
    self._start_rollouts()
    bar = self._bar(cfg.steps, self.progress.rl_step, "rl")
    acc = self.progress.start_accuracy if cfg.steps == 0 else None
    while self.progress.rl_step < cfg.steps and not self.collapse.stopped:
      step = self.progress.rl_step + 1
      m = self._rl_step(step)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        m.update(self._evaluation(eval_key))
        acc = m["eval/accuracy"]
      m.update(self._full_evaluation(step, eval_key))
      self.progress.rl_step = step
      self._advance(bar, m, ("reward/mean", "reward/zero_adv_frac", "eval/accuracy",
                             "policy/entropy", "mismatch/kl_k3"))
      self._record("rl", step, m)
      if (step % self.s.checkpoint.every == 0 or step == cfg.steps
          or self.collapse.stopped):
        self._save()
      if step < cfg.steps and self.signals.requested():
        self._stop_for_signal("rl")
    bar.close()
    if acc is None:
      acc = self.evaluate(self.s.data.eval_size, eval_key)["avg@1"]
    self.no_signal.summarize(self.progress.rl_step)
    return {"sft_steps": self.progress.sft_step, "rl_steps": self.progress.rl_step,
            "rl_steps_without_signal": self.no_signal.total,
            "collapsed_at_rl_step": self.collapse.step,
            "accuracy_after_sft": self.progress.start_accuracy, "accuracy_after_rl": acc,
            "metrics": self.writer.path}

  def _evaluation(self, key, size: Optional[int] = None, name: str = "eval/accuracy"):
    """Held-out accuracy under the sampler's policy, and with `rl.eval_trainer` under the
    trainer's own (`<name>_trainer`)."""
    size = size or self.s.data.eval_size
    m = {name: self.evaluate(size, key)["avg@1"]}
    if self.s.rl.eval_trainer:
      m[f"{name}_trainer"] = self.evaluate_trainer(size, key)
    return m

  def evaluate_trainer(self, size: int, key) -> float:
    """Held-out accuracy (avg@1) sampled from the trainer's policy: the sampler without a
    quantised format, computing in the trainer's dtype, on the trainer's devices."""
    s = self.s
    engine = dataclasses.replace(s.sampler, dtype=s.model.compute_dtype,
                                 activation_dtype=None, kv_cache_dtype=None,
                                 quantize_embeddings=False, logit_noise=0.0)
    fns = dataclasses.replace(self.fns, s=dataclasses.replace(s, sampler=engine),
                              sampler_mesh=None)
    batches = self.data.eval_batches(s, size, rollout_lib.EVAL_BATCH)
    return fns.evaluate(fns.quantize(self.state.params), batches, key)["avg@1"]

  def _full_evaluation(self, step: int, key) -> dict[str, float]:
    """`eval/accuracy_full` on `data.full_eval_size` problems at `rl.full_eval_steps`."""
    size = self.s.data.full_eval_size
    if not size or step not in self.s.rl.full_eval_steps:
      return {}
    return self._evaluation(key, size, "eval/accuracy_full")

  def _start_rollouts(self):
    """The sampler's queue at the current step: the current weights published, and on a
    resume the rollouts (and older weights) the checkpoint saved in flight."""
    k = self.s.rl.max_staleness
    self.rollouts = inflight.Rollouts(k, self.fns.sample, self.rl_iter, self.keys.rollout)
    version = self.progress.rl_step
    self.rollouts.publish(version, self.publish(self.state.params))
    if not k:
      return
    self.versions = {version: self._copy(self.state.params)}
    saved = inflight.restore(self.inflight_dir, self.progress.global_step,
                             lambda r: sharding.shard_batch(r, self.meshes.trainer),
                             self.state.params) if version else None
    if saved is not None:  # the sampler needs only the current weights from here on
      self.rollouts.pending, older = saved
      self.versions.update(older)

  @staticmethod
  def _copy(params):
    return jax.tree.map(lambda x: x.copy(), params)  # the update donates the state

  def _rl_step(self, step):
    """The five calls of one RL step (`rl.step`), timed, then the new weights published.

    With `rl.max_staleness` = k the sampler has steps up to step + k dispatched before the
    trainer starts on this one (their weights are already published), so on its own
    devices it samples them while the trainer scores, forms pi_old and updates; `sample`
    then times the trainer's wait for this step's rollout.
    """
    f, clock, k = self.fns, watchers.Clock(), self.s.rl.max_staleness
    self.rollouts.dispatch_through(min(step + k, self.s.rl.steps), step)
    prompts, rollout, version = self.rollouts.take(step)
    rollout = clock.lap("sample", rollout)
    rewards, reward_m = clock.lap("score", f.score(rollout, prompts))
    advantages, adv_m = f.advantages(rewards)
    rollout = sharding.shard_batch(rollout, self.meshes.trainer)
    batch, batch_m = clock.lap("pi_old", f.pi_old(self.state.params, rollout, advantages))
    stale_m = self._staleness_metrics(rollout, batch, version) if k else {}
    self.state, train_m = f.update(self.state, batch, step)
    clock.lap("train", self.state)
    self.rollouts.publish(step, clock.lap("publish", self.publish(self.state.params)))
    if k:
      self.versions[step] = self._copy(self.state.params)
      for old in [v for v in self.versions if v < step - k]:
        del self.versions[old]
    m = {**metrics_lib.to_python({**reward_m, **adv_m, **batch_m, **stale_m}), **train_m,
         **clock.metrics, "staleness/versions": float(step - 1 - version)}
    m["time/step_s"] = time.perf_counter() - clock.start
    m["throughput/tok_s"] = m["rollout/tokens"] / m["time/step_s"]
    return m

  def _staleness_metrics(self, rollout, batch, version: int) -> dict:
    """The train-infer KL split: the rollout scored by the trainer with the weights that
    sampled it (`version`) separates the format's part, KL(mu || pi_version), from the
    staleness's, KL(pi_version || pi_old) (k3 estimates on the sampled tokens)."""
    if version == self.progress.rl_step:
      stale_logp = batch.old_logp
    else:
      stale_logp, _ = self.fns.pi_old(self.versions[version], rollout, batch.advantages)
      stale_logp = stale_logp.old_logp
    fmt = objectives.diagnostics.mismatch_metrics(batch.replace(old_logp=stale_logp))
    stale = objectives.diagnostics.mismatch_metrics(batch.replace(mu_logp=stale_logp))
    return {"mismatch/kl_k3_format": fmt["mismatch/kl_k3"],
            "mismatch/kl_k3_staleness": stale["mismatch/kl_k3"]}

  # --- progress display ----------------------------------------------------------------------

  def _bar(self, total, initial, stage):
    return tqdm.tqdm(total=total, initial=initial, desc=stage, dynamic_ncols=True,
                     disable=not self.s.log.progress, mininterval=1.0)

  def _advance(self, bar, m, keys):
    bar.set_postfix({_LABELS[k]: f"{m[k]:.3g}" for k in keys if k in m}, refresh=False)
    bar.update(1)


_LABELS = {"sft/loss": "loss", "eval/accuracy": "acc", "reward/mean": "reward",
           "reward/zero_adv_frac": "zero_adv", "policy/entropy": "entropy",
           "mismatch/kl_k3": "kl"}


def _check_batch_sizes(s: settings_lib.Settings, meshes: placement.Meshes,
                       num_eval_records: int) -> None:
  """Every batch must split evenly over its mesh's batch axes (data x fsdp x expert): the
  trainer's batches over the trainer's mesh, the sampler's slots over the sampler's."""
  eval_batch = lambda size: min(rollout_lib.EVAL_BATCH, size, num_eval_records)
  trainer = sharding.batch_size_multiple(meshes.trainer)
  sampler = sharding.batch_size_multiple(meshes.sampler)
  mesh_name = "sampler_mesh" if meshes.disaggregated else "mesh"
  for field, value, multiple, name in (
      ("rl.mini_batch_size", s.rl.mini_batch_size, trainer, "mesh"),
      ("rl.micro_batch_size", s.rl.micro_batch_size or trainer, trainer, "mesh"),
      ("sft.batch_size", s.sft.batch_size, trainer, "mesh"),
      ("sft.micro_batch_size", s.sft.micro_batch_size or trainer, trainer, "mesh"),
      ("sampler.slots", s.sampler.slots or sampler, sampler, mesh_name),
      ("data.eval_size", eval_batch(s.data.eval_size), trainer, "mesh"),
      ("sft.eval_size", eval_batch(s.sft.eval_size), trainer, "mesh"),
      ("data.full_eval_size",
       eval_batch(s.data.full_eval_size) if s.data.full_eval_size else trainer, trainer,
       "mesh")):
    if value % multiple:
      raise errors.UserError(f"{field} ({value}) must be a multiple of the data-parallel "
                             f"size ({multiple} = {name} data x fsdp x expert)")
