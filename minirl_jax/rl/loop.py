"""The main job: cold-start SFT, then synchronous RL (PAPER.md "Training loop").

A thin loop over `rl.step`'s calls: SFT updates, RL steps, evaluation, checkpoints, logs.
Every step's metrics go to DIR/metrics.jsonl and TensorBoard; orbax checkpoints make a rerun
resume where it stopped.
"""
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
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import keys as keys_lib
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
    self.mesh = sharding.make_mesh(s.mesh)
    _check_batch_sizes(s, self.mesh, len(self.data.eval_records))
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
                           self.state_sharding)
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

  def evaluate(self, size: int, key, samples: int = 1) -> dict[str, float]:
    """Held-out avg@k and pass@k of the current params (sampler dtype, temperature)."""
    batches = self.data.eval_batches(self.s, size, rollout_lib.EVAL_BATCH)
    return self.fns.evaluate(self.fns.quantize(self.state.params), batches, key,
                             samples=samples)

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
      acc = self.evaluate(self.s.data.eval_size, eval_key)["avg@1"]
      self._record("rl", 0, {"eval/accuracy": acc, **self._full_evaluation(0, eval_key)})
      self.progress.start_accuracy = acc
    sampler_params = self.fns.quantize(self.state.params)
    bar = self._bar(cfg.steps, self.progress.rl_step, "rl")
    acc = self.progress.start_accuracy if cfg.steps == 0 else None
    while self.progress.rl_step < cfg.steps and not self.collapse.stopped:
      step = self.progress.rl_step + 1
      m, sampler_params = self._rl_step(step, sampler_params)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        acc = m["eval/accuracy"] = self.evaluate(self.s.data.eval_size, eval_key)["avg@1"]
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

  def _full_evaluation(self, step: int, key) -> dict[str, float]:
    """`eval/accuracy_full` on `data.full_eval_size` problems at `rl.full_eval_steps`."""
    size = self.s.data.full_eval_size
    if not size or step not in self.s.rl.full_eval_steps:
      return {}
    return {"eval/accuracy_full": self.evaluate(size, key)["avg@1"]}

  def _rl_step(self, step, sampler_params):
    """The five calls of one RL step (`rl.step`), timed, then re-quantise."""
    f, clock = self.fns, watchers.Clock()
    prompts = next(self.rl_iter)
    rollout = clock.lap("sample", f.sample(sampler_params, prompts, self.keys.rollout(step)))
    rewards, reward_m = clock.lap("score", f.score(rollout, prompts))
    advantages, adv_m = f.advantages(rewards)
    batch, batch_m = clock.lap("pi_old", f.pi_old(self.state.params, rollout, advantages))
    self.state, train_m = f.update(self.state, batch, step)
    sampler_params = clock.lap("train", f.quantize(self.state.params))
    m = {**metrics_lib.to_python({**reward_m, **adv_m, **batch_m}), **train_m,
         **clock.metrics}
    m["time/step_s"] = time.perf_counter() - clock.start
    m["throughput/tok_s"] = m["rollout/tokens"] / m["time/step_s"]
    return m, sampler_params

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


def _check_batch_sizes(s: settings_lib.Settings, mesh, num_eval_records: int) -> None:
  """Every batch must split evenly over the mesh's batch axes (data x fsdp x expert)."""
  multiple = sharding.batch_size_multiple(mesh)
  eval_batch = lambda size: min(rollout_lib.EVAL_BATCH, size, num_eval_records)
  for field, value in (("rl.mini_batch_size", s.rl.mini_batch_size),
                       ("rl.micro_batch_size", s.rl.micro_batch_size or multiple),
                       ("sft.batch_size", s.sft.batch_size),
                       ("sft.micro_batch_size", s.sft.micro_batch_size or multiple),
                       ("sampler.slots", s.sampler.slots or multiple),
                       ("data.eval_size", eval_batch(s.data.eval_size)),
                       ("sft.eval_size", eval_batch(s.sft.eval_size)),
                       ("data.full_eval_size",
                        eval_batch(s.data.full_eval_size) if s.data.full_eval_size else multiple)):
    if value % multiple:
      raise errors.UserError(f"{field} ({value}) must be a multiple of the data-parallel "
                             f"size ({multiple} = mesh data x fsdp x expert)")
