"""Runs a grid's arms as separate `scripts/train.py` processes, at most J at once, resumably.

Layout under the grid's workdir:
  _coldstart/<key>/seed_0/     SFT only (rl.steps=0), shared by every arm and seed with the
                               same cold-start overrides (the paper starts all arms from one
                               cold-start model; seeds vary the RL run: sampling, mini-batches)
  <arm>/seed_<k>/              the arm: starts from a copy of its cold start's checkpoints
  each run dir: metrics.jsonl, checkpoints/, log.txt, and summary.json once it finished
                               (`layout`: run names and dirs)
A rerun skips finished runs (summary.json) and resumes interrupted ones from their latest
checkpoint (`train.py` resumes by itself).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import tqdm

from minirl_jax import errors
from minirl_jax.experiments import design
from minirl_jax.experiments import grids
from minirl_jax.experiments import layout
from minirl_jax.rl import watchers


@dataclasses.dataclass(frozen=True)
class Job:
  """One process: a run directory and the flags that define it."""
  workdir: str
  flags: tuple[str, ...]
  cold_start: Optional[str] = None  # run dir whose checkpoints this run starts from

  @property
  def done(self) -> bool:
    return layout.done(self.workdir)


def _key(overrides) -> str:
  if not overrides:
    return "default"
  text = json.dumps(sorted((k, repr(v)) for k, v in overrides.items()))
  return hashlib.sha1(text.encode()).hexdigest()[:10]


COLD_START_SEED = 0


def plan(grid: design.Grid, seeds: int, workdir: str) -> tuple[list[Job], list[Job]]:
  """(cold-start jobs, arm jobs) of a grid at RL seeds 0..seeds-1, seed by seed: every arm
  has a first seed before any has a second, so a grid cut short still compares all arms."""
  cold, arms = {}, []
  for seed in range(seeds):
    for arm in grid.arms:
      if seed >= arm.seeds_at(seeds):
        continue
      cold_flags = grids.flags(arm.cold_start)
      cold_dir = layout.run_dir(os.path.join(workdir, "_coldstart"), _key(arm.cold_start),
                                COLD_START_SEED)
      cold.setdefault(cold_dir, Job(cold_dir, (f"--config.seed={COLD_START_SEED}",
                                               *cold_flags, "--config.rl.steps=0")))
      arms.append(Job(layout.run_dir(workdir, arm.name, seed),
                      (f"--config.seed={seed}", *cold_flags, *grids.flags(arm.overrides)),
                      cold_start=cold_dir))
  return list(cold.values()), arms


def branch(cold_start: str, workdir: str) -> None:
  """Seeds a fresh run dir with a cold start's checkpoints and SFT metrics, so the run
  resumes from there (a dir that has checkpoints already resumes from its own)."""
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    return
  staging = workdir + ".staging"
  shutil.rmtree(staging, ignore_errors=True)
  shutil.copytree(os.path.join(cold_start, "checkpoints"), os.path.join(staging, "checkpoints"))
  shutil.copy(os.path.join(cold_start, "metrics.jsonl"), staging)
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  if os.path.exists(workdir):  # a dir without checkpoints: an attempt that never began
    shutil.rmtree(workdir)
  os.rename(staging, workdir)


class _Process:
  def __init__(self, job: Job, base_config: str, root: str):
    if job.cold_start:
      branch(job.cold_start, job.workdir)
    os.makedirs(job.workdir, exist_ok=True)
    self.job, self.start = job, time.time()
    self.log = open(os.path.join(job.workdir, "log.txt"), "a", encoding="utf-8")
    cmd = [sys.executable, os.path.join(root, "scripts", "train.py"),
           f"--config={os.path.join(root, base_config)}", *job.flags,
           "--config.log.progress=False", f"--workdir={job.workdir}"]
    self.log.write("$ " + " ".join(cmd) + "\n")
    self.log.flush()
    self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)

  def finish(self) -> None:
    """Waits for the process; writes summary.json from its last output line. A run the
    non-finite guard or the reward check stopped (`errors.STOPPED_STATUS`) is a finished
    result, not a failure: its metrics say where it collapsed."""
    out, _ = self.proc.communicate()
    self.log.write(out)
    self.log.close()
    log_path = os.path.join(self.job.workdir, "log.txt")
    if self.proc.returncode == errors.STOPPED_STATUS:
      with open(log_path, encoding="utf-8") as f:
        summary = {"stopped": f.read().strip().splitlines()[-1]}
    elif self.proc.returncode:
      raise RuntimeError(f"{self.job.workdir} failed (exit {self.proc.returncode}); see "
                         f"{log_path}")
    else:
      summary = json.loads(out.strip().splitlines()[-1])
    summary["wall_s"] = time.time() - self.start
    layout.write_summary(self.job.workdir, summary)

  def stop(self) -> None:
    """Passes SIGTERM on and waits: `train.py` saves a checkpoint after its current step and
    exits; no summary, so a rerun resumes it."""
    self.proc.terminate()
    out, _ = self.proc.communicate()
    self.log.write(out)
    self.log.close()


class _Queue:
  """The jobs still to run, the running processes, and the failures so far."""

  def __init__(self, jobs: list[Job], base_config: str, root: str, max_jobs: int, bar):
    self.todo = [j for j in jobs if not j.done]
    self.running: list[_Process] = []
    self.failures: list[str] = []
    self.base_config, self.root, self.max_jobs, self.bar = base_config, root, max_jobs, bar

  @property
  def busy(self) -> bool:
    return bool(self.todo or self.running)

  def _ready(self, job: Job) -> bool:
    return not job.cold_start or layout.done(job.cold_start)

  def _coming(self, path: str) -> bool:
    return any(j.workdir == path for j in self.todo) or any(
        p.job.workdir == path for p in self.running)

  def drop_orphans(self) -> None:
    """Jobs whose cold start neither finished nor is still to come (it failed) fail."""
    for job in [j for j in self.todo if not self._ready(j) and not self._coming(j.cold_start)]:
      self.todo.remove(job)
      self.failures.append(f"{job.workdir} not run: its cold start {job.cold_start} did "
                           "not finish")
      self.bar.update(1)

  def start_ready(self) -> None:
    for job in [j for j in self.todo if self._ready(j)][:self.max_jobs - len(self.running)]:
      self.todo.remove(job)
      self.running.append(_Process(job, self.base_config, self.root))

  def reap(self) -> None:
    for p in [p for p in self.running if p.proc.poll() is not None]:
      self.running.remove(p)
      try:
        p.finish()
      except RuntimeError as e:
        self.failures.append(str(e))
      self.bar.update(1)

  def stop(self, signum: int) -> errors.RunStopped:
    for p in self.running:
      p.stop()
    return errors.RunStopped(
        f"{signal.Signals(signum).name}: {len(self.running)} running run(s) saved a "
        f"checkpoint and stopped, {len(self.todo)} not started; run the same command to "
        "resume", status=128 + signum)

  def kill(self) -> None:
    for p in self.running:
      if p.proc.poll() is None:
        p.proc.kill()
        p.proc.wait()


def run_jobs(jobs: list[Job], *, base_config: str, root: str, max_jobs: int,
             desc: str, progress: bool = True) -> None:
  """Runs the unfinished jobs in order, at most `max_jobs` at once; a job waits for its
  cold start if that is among the jobs, so arms start as soon as their own cold start has
  finished. A failed job does not stop the others (a long grid keeps going unattended); the
  failures are raised together at the end, and the arms of a failed cold start with them.
  SIGTERM / SIGINT (preemption, Ctrl-C) pass SIGTERM on to the running jobs, which save a
  checkpoint and stop, and raise `errors.RunStopped`; a second SIGINT kills them at once."""
  with tqdm.tqdm(total=len(jobs), initial=sum(j.done for j in jobs), desc=desc,
                 disable=not progress, dynamic_ncols=True) as bar:
    queue = _Queue(jobs, base_config, root, max_jobs, bar)
    try:
      with watchers.StopSignals() as signals:
        while queue.busy and signals.received is None:
          queue.drop_orphans()
          queue.start_ready()
          time.sleep(0.2)
          queue.reap()
        if signals.received is not None:
          raise queue.stop(signals.received)
    finally:
      queue.kill()
  if queue.failures:
    raise RuntimeError(f"{len(queue.failures)} run(s) failed:\n" + "\n".join(queue.failures))


def run_grid(grid: design.Grid, *, seeds: int, workdir: str, max_jobs: int, root: str,
             progress: bool = True) -> None:
  """Cold starts first, then every arm x seed, each arm as soon as its cold start is
  done."""
  cold, arms = plan(grid, seeds, workdir)
  run_jobs(cold + arms, base_config=grid.base_config, root=root, max_jobs=max_jobs,
           desc=f"{grid.name}: runs", progress=progress)
