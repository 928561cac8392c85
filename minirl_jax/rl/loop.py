"""The main job: cold-start SFT, then synchronous RL (PAPER.md "Training loop").

A thin loop over `rl.step`'s calls: SFT updates, RL steps, evaluation, checkpoints, logs.
Every step's metrics go to DIR/metrics.jsonl and TensorBoard; orbax checkpoints make a rerun
resume where it stopped.
"""
import dataclasses
import os
import signal
import threading
import time
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax import metrics as metrics_lib
from minirl_jax import sharding
from minirl_jax.rl import checkpointing
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import rollout as rollout_lib
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_state
from minirl_jax.rl import wiring


class Clock:
  """Wall time of a step's phases: `lap(name, value)` waits for `value` and books the time
  since the previous lap as `time/{name}_s`."""

  def __init__(self):
    self.start = self._last = time.perf_counter()
    self.metrics = {}

  def lap(self, name, value):
    value = jax.block_until_ready(value)
    now = time.perf_counter()
    self.metrics[f"time/{name}_s"] = now - self._last
    self._last = now
    return value


class SkipGuard:
  """Counts steps in a row whose update was skipped as not finite (`train_state.GUARDED`);
  at `limit` the run stops, naming the step and the first quantity that was not finite."""

  def __init__(self, limit: int):
    self.limit, self.in_a_row = limit, 0

  def observe(self, stage: str, step: int, m: dict) -> None:
    if not m.get("optim/skipped", 0.0) > 0:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    first = next((q for q in train_state.GUARDED if m.get(f"optim/nonfinite_{q}", 0.0) > 0),
                 "update")
    logging.warning("%s step %d: %s not finite, update skipped (%d in a row)", stage, step,
                    first, self.in_a_row)
    if self.in_a_row >= self.limit:
      raise errors.RunStopped(
          f"{stage} step {step}: {self.in_a_row} updates in a row were skipped because the "
          f"{first} was not finite (optim.max_skipped_in_a_row={self.limit}); nothing was "
          "saved after the last finite checkpoint. Lower the learning rate or check the data")


def from_process_0(values) -> np.ndarray:
  """`values` as process 0 has them, on every process: state a resumed run rebuilds from
  metrics.jsonl, which process 0 alone holds."""
  values = np.asarray(values, np.float64)
  return multihost_utils.broadcast_one_to_all(values) if jax.process_count() > 1 else values


class NoSignalWatch:
  """Counts RL steps without learning signal: every group's rewards were equal
  (`reward/zero_adv_frac` = 1), so every advantage was 0 and the update learned nothing.
  One warning names them when `warn_after` such steps in a row have passed, and again at
  each doubling of the streak (2x, 4x, ...): a collapsed run says so without a line every
  few steps."""

  def __init__(self, warn_after: int):
    self.warn_after, self.in_a_row, self.total = warn_after, 0, 0

  def observe(self, step: int, m: dict, warn: bool = True) -> None:
    if m.get("reward/zero_adv_frac", 0.0) < 1:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    periods, rest = divmod(self.in_a_row, self.warn_after)
    if warn and not rest and periods & (periods - 1) == 0:
      logging.warning(
          "RL steps %d-%d had no learning signal: in each, every group's rewards were "
          "equal, so every advantage was 0 (rl.no_signal_warn_steps=%d). Check the reward "
          "(always the same?) and the learning rate (a broken model scores 0 everywhere)",
          step - self.in_a_row + 1, step, self.warn_after)

  def resume(self, records, step: int) -> None:
    """Recounts RL steps 1..`step` from the metrics records kept on resume (in step order)."""
    for r in records:
      if r["stage"] == "rl" and 0 < r["step"] <= step:
        self.observe(r["step"], r, warn=False)
    self.in_a_row, self.total = (int(c) for c in from_process_0([self.in_a_row, self.total]))

  def summarize(self, rl_steps: int) -> None:
    if rl_steps and self.total == rl_steps:
      logging.warning("No RL step had a learning signal (%d of %d): every group's rewards "
                      "were equal in each, so RL learned nothing", self.total, rl_steps)


class StopSignals:
  """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to stop after the current step;
  a second SIGINT interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning("received %s: stopping after this step", signal.Signals(signum).name)

  def requested(self) -> bool:
    """Whether any process received a stop signal (all processes stop at the same step)."""
    flag = self.received is not None
    if jax.process_count() > 1:
      flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
    return flag


class Run:
  """One experiment in one workdir: build, resume, SFT, RL, plots."""

  def __init__(self, s: settings_lib.Settings, workdir: str,
               data: Optional[rl_data.RunData] = None):
    settings_lib.check_trainable(s)
    self.s, self.workdir = s, workdir
    self.data = data or rl_data.build(s)  # validates data before anything compiles
    self.mesh = sharding.make_mesh(s.mesh)
    _check_batch_sizes(s, self.mesh, len(self.data.eval_records))
    self.key = jax.random.key(s.seed)
    self.state, self.state_sharding = checkpointing.initial_state(s, self.mesh,
                                                       jax.random.fold_in(self.key, 0))
    self.fns = wiring.bind(s, self.mesh, self.data.tokenizer, self.data.reward_fn,
                             self.state_sharding)
    self.sft_iter = self.data.sft_iterator(s)
    self.rl_iter = self.data.rl_iterator(s)
    self.progress = checkpointing.Progress()
    self.ckpt = checkpointing.Manager(os.path.join(workdir, "checkpoints"), s.checkpoint)
    self.writer: Optional[metrics_lib.MetricWriter] = None
    self.guard = SkipGuard(s.rl_optim().max_skipped_in_a_row)
    self.no_signal = NoSignalWatch(s.rl.no_signal_warn_steps)
    self.collapse = collapse.CollapseWatch()
    self.signals = StopSignals()

  def run(self) -> dict:
    if self.restore():
      logging.info("Resumed from %s: %s", self.ckpt.directory, self.progress)
    lead = jax.process_index() == 0  # one process writes the shared metrics and plots
    if lead:
      metrics_lib.keep_only(os.path.join(self.workdir, "metrics.jsonl"), self._logged_before)
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=lead,
                                           wandb_project=self.s.log.wandb_project,
                                           config=dataclasses.asdict(self.s))
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
    """Waits for checkpoint writes and stops the reward workers."""
    self.ckpt.close()
    if self.writer is not None:
      self.writer.close()
    self.fns.close()

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
        acc = self.evaluate(cfg.eval_size, jax.random.fold_in(self.key, step))["avg@1"]
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
    self.state = train_state.fresh_optimizer(self.state.params, self.fns.rl_optimizer,
                                           self.state_sharding)
    self._save()

  def _log_sft(self, bar, step, metrics, extra):
    m = {**metrics_lib.to_python(metrics), **extra}
    now = time.perf_counter()
    m["time/step_s"], self._sft_clock = now - self._sft_clock, now
    self.writer.write(step, "sft", m)
    self._advance(bar, m, ("sft/loss", "eval/accuracy"))
    self.guard.observe("sft", step, m)

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
    eval_key = jax.random.fold_in(self.key, 1)
    if self.progress.rl_step == 0:
      acc = self.evaluate(self.s.data.eval_size, eval_key)["avg@1"]
      first = {"eval/accuracy": acc, **self._full_evaluation(0, eval_key)}
      self.writer.write(0, "rl", first)
      self.collapse.observe(0, first)
      self.progress.start_accuracy = acc
    else:
      records = self._kept_records()
      self.no_signal.resume(records, self.progress.rl_step)
      self._resume_collapse_watch(records)
    sampler_params = self.fns.quantize(self.state.params)
    bar = self._bar(cfg.steps, self.progress.rl_step, "rl")
    acc = self.progress.start_accuracy if cfg.steps == 0 else None
    while self.progress.rl_step < cfg.steps and not self._stopped_by_collapse():
      step = self.progress.rl_step + 1
      m, sampler_params = self._rl_step(step, sampler_params)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        acc = m["eval/accuracy"] = self.evaluate(self.s.data.eval_size, eval_key)["avg@1"]
      m.update(self._full_evaluation(step, eval_key))
      self.progress.rl_step = step
      self.writer.write(step, "rl", m)
      self._advance(bar, m, ("reward/mean", "reward/zero_adv_frac", "eval/accuracy",
                             "policy/entropy", "mismatch/kl_k3"))
      self.guard.observe("rl", step, m)
      self.no_signal.observe(step, m)
      self._observe_collapse(step, m)
      if (step % self.s.checkpoint.every == 0 or step == cfg.steps
          or self._stopped_by_collapse()):
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

  def _observe_collapse(self, step: int, m: dict) -> None:
    if self.collapse.observe(step, {k: float(v) for k, v in m.items()}) == step:
      logging.warning("RL step %d: the run collapsed by the stated criterion (%s)%s", step,
                      self.collapse.reason(), "; it stops here (rl.stop_on_collapse)"
                      if self.s.rl.stop_on_collapse else "")

  def _stopped_by_collapse(self) -> bool:
    return self.s.rl.stop_on_collapse and self.collapse.step is not None

  def _resume_collapse_watch(self, records) -> None:
    """Replays the kept records of RL steps 0..rl_step, so a resumed run reads the
    criterion as an uninterrupted one would (and a run stopped at its collapse stays
    stopped)."""
    for r in records:
      if r["stage"] == "rl" and r["step"] <= self.progress.rl_step:
        self.collapse.observe(r["step"], r)
    peak, step = from_process_0([self.collapse.peak, -1 if self.collapse.step is None
                                 else self.collapse.step])
    self.collapse.peak, self.collapse.step = float(peak), None if step < 0 else int(step)

  def _full_evaluation(self, step: int, key) -> dict[str, float]:
    """`eval/accuracy_full` on `data.full_eval_size` problems at `rl.full_eval_steps`."""
    size = self.s.data.full_eval_size
    if not size or step not in self.s.rl.full_eval_steps:
      return {}
    return {"eval/accuracy_full": self.evaluate(size, key)["avg@1"]}

  def _kept_records(self) -> list[dict]:
    """metrics.jsonl as `run` kept it on resume (process 0's file; [] elsewhere)."""
    if jax.process_index() or not os.path.exists(self.writer.path):
      return []
    return metrics_lib.read_jsonl(self.writer.path)

  def _rl_step(self, step, sampler_params):
    """The five calls of one RL step (`rl.step`), timed, then re-quantise."""
    f, clock = self.fns, Clock()
    prompts = next(self.rl_iter)
    key = jax.random.fold_in(self.key, 1000 + step)
    rollout = clock.lap("sample", f.sample(sampler_params, prompts, key))
    rewards, reward_m = clock.lap("score", f.score(rollout, prompts))
    advantages, adv_m = f.advantages(rewards)
    batch, batch_m = clock.lap("old_logp", f.old_policy(self.state.params, rollout, advantages))
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
      raise errors.UserError(f"{field} ({value}) must be a multiple of the data-parallel size "
                       f"({multiple} = mesh data x fsdp x expert)")
