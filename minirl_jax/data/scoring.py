"""Scoring completions with a reward function in worker processes, each call under a timeout.

A call that raises, returns anything but a number in [0, 1] (`reward_worker.as_reward`),
crashes its worker or runs past its timeout scores 0 and is counted, and the first of each
distinct failure is logged; scoring never raises because of a completion. `ErrorStreak`
stops a run whose reward function fails on most calls step after step.
"""
import dataclasses
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from multiprocessing import connection
from typing import Optional

from absl import logging
import numpy as np

import minirl_jax
from minirl_jax import errors
from minirl_jax.data.rewards import RewardFn
from minirl_jax.data.rewards import math_reward

# Distinct failures logged per scorer; a message that quotes the completion makes every
# failure distinct, and past this many they are only counted.
MAX_LOGGED = 20


@dataclasses.dataclass(frozen=True)
class Scored:
  """A batch's rewards and its failed calls."""
  rewards: np.ndarray  # float32 [calls], 0 where the call failed
  failures: dict[int, str]  # call index -> what went wrong
  timeouts: int  # how many of `failures` ran past the timeout

  @property
  def metrics(self) -> dict[str, float]:
    return {"reward/errors": float(len(self.failures) - self.timeouts),
            "reward/timeouts": float(self.timeouts)}

  def first_failure(self) -> Optional[str]:
    """`what went wrong (prompt i)` for the lowest failed index i; None without failures."""
    if not self.failures:
      return None
    index = min(self.failures)
    return f"{self.failures[index]} (prompt {index})"


class RewardScorer:
  """Scores completions in worker processes, killing any call that runs past `timeout_s`.

  Processes, not threads: a thread cannot be stopped, and a reward call stuck in C code
  (e.g. sympy evaluating 9^{9^{9^9}} inside math-verify) holds the GIL and freezes every
  thread, the caller's included; SIGALRM timeouts only work on the main thread. A worker is
  killed and replaced on timeout or crash. Workers are fresh interpreters running
  `minirl_jax.data.reward_worker` (never forked: JAX is multithreaded; never multiprocessing's
  spawn, which re-imports the training script and JAX in each one), so `reward_fn` must be
  picklable by reference from an importable module, e.g. a module-level function.
  """

  def __init__(self, reward_fn: RewardFn, *, timeout_s: float = 5.0, num_workers: int = 1,
               preload: Optional[Sequence[str]] = None, startup_timeout_s: float = 120.0):
    if getattr(reward_fn, "__module__", None) == "__main__":
      raise TypeError(f"reward_fn {reward_fn!r} is defined in the script being run: reward "
                      "workers import it by module name, so move it to a module")
    try:
      self._reward_pickle = pickle.dumps(reward_fn)
    except Exception as e:
      raise TypeError(f"reward_fn {reward_fn!r} must be picklable (e.g. a module-level function): "
                      "rewards run in worker processes") from e
    if timeout_s <= 0 or num_workers < 1:
      raise ValueError(f"need timeout_s > 0 and num_workers >= 1, got {timeout_s}, {num_workers}")
    self.reward_fn, self.timeout_s = reward_fn, timeout_s
    # Modules a worker imports before it takes calls, so their import time never counts
    # against a call (math-verify + sympy take seconds to import).
    self._preload = tuple(preload) if preload is not None else (
        ("math_verify",) if reward_fn is math_reward else ())
    self._startup_timeout_s = startup_timeout_s
    self._logged, self._quiet = set(), False  # failures logged; past MAX_LOGGED
    self._workers = []  # [(process, connection)], replaced in place
    self._stop_workers = weakref.finalize(self, _stop_all, self._workers)
    for _ in range(num_workers):
      self._workers.append(self._start_worker())

  def _start_worker(self):
    conn, child = multiprocessing.Pipe()  # a socket pair; the worker is told its end's number
    with child:
      process = subprocess.Popen(
          [sys.executable, "-m", "minirl_jax.data.reward_worker", str(child.fileno())],
          pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=_worker_env())
    problem = None
    try:
      conn.send((sys.path, self._reward_pickle, self._preload))
      if conn.poll(self._startup_timeout_s):
        status, detail = conn.recv()
        problem = None if status == "ready" else detail
      else:
        problem = f"not ready after {self._startup_timeout_s} s"
    except (EOFError, OSError) as e:
      problem = f"{e!r}; see its stderr"
    if problem is not None:
      _stop(process, conn)
      raise RuntimeError(f"reward worker for {self.reward_fn!r} failed to start ({problem}); "
                         "a worker imports reward_fn by its module name")
    return process, conn

  def _replace_worker(self, slot: int):
    _stop(*self._workers[slot])
    self._workers[slot] = self._start_worker()

  def score(self, prompts: Sequence[str], completions: Sequence[str],
            answers: Sequence[str]) -> tuple[np.ndarray, dict[str, float]]:
    """Scores a batch; see `score_batch`."""
    scored = self.score_detailed(prompts, completions, answers)
    return scored.rewards, scored.metrics

  def score_detailed(self, prompts: Sequence[str], completions: Sequence[str],
                     answers: Sequence[str]) -> Scored:
    """Scores a batch and says which calls failed and why; logs each new kind of failure."""
    if not len(prompts) == len(completions) == len(answers):
      raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(completions)} completions, "
                       f"{len(answers)} answers")
    calls = [(i, str(p), str(c), str(a))
             for i, (p, c, a) in enumerate(zip(prompts, completions, answers))]
    rewards = np.zeros(len(calls), np.float32)
    failures, timeouts = {}, []
    # Each worker takes a contiguous chunk and streams back one result per call; a call's
    # clock starts when the previous result of its worker arrives.
    chunks = np.array_split(np.arange(len(calls)), len(self._workers))
    pending = {slot: [calls[i] for i in chunk] for slot, chunk in enumerate(chunks) if len(chunk)}
    for slot, chunk in pending.items():
      self._workers[slot][1].send(chunk)
    started = {slot: time.monotonic() for slot in pending}
    while pending:
      self._collect(pending, started, rewards, failures, timeouts)
    self._log_new(failures)
    return Scored(rewards, failures, len(timeouts))

  def _collect(self, pending, started, rewards, failures, timeouts):
    """Waits for the next result or deadline and books it."""
    conn_slot = {self._workers[slot][1]: slot for slot in pending}
    deadline = min(started.values()) + self.timeout_s
    for conn in connection.wait(list(conn_slot), timeout=max(0.0, deadline - time.monotonic())):
      slot = conn_slot[conn]
      try:
        index, status, value = conn.recv()
      except (EOFError, OSError):  # the worker died mid-call
        failures[pending[slot][0][0]] = _death(self._workers[slot][0])
        self._fail_current(slot, pending, started)
        continue
      if status == "ok":
        rewards[index] = value
      else:
        failures[index] = value
      self._advance(slot, pending, started)
    now = time.monotonic()
    for slot in [s for s in pending if now - started[s] >= self.timeout_s]:
      index = pending[slot][0][0]
      failures[index] = f"timed out after {self.timeout_s:g} s"
      timeouts.append(index)
      self._fail_current(slot, pending, started)

  def _advance(self, slot, pending, started):
    pending[slot] = pending[slot][1:]
    started[slot] = time.monotonic()
    if not pending[slot]:
      del pending[slot], started[slot]

  def _fail_current(self, slot, pending, started):
    self._replace_worker(slot)
    self._advance(slot, pending, started)
    if slot in pending:
      self._workers[slot][1].send(pending[slot])

  def _log_new(self, failures: dict[int, str]):
    """Logs the first occurrence of each distinct failure, in call order."""
    for index in sorted(failures):
      text = failures[index]
      if text in self._logged or self._quiet:
        continue
      if len(self._logged) == MAX_LOGGED:
        self._quiet = True
        logging.warning("reward function: over %d distinct failures; new ones are only counted "
                        "in reward/errors and reward/timeouts", MAX_LOGGED)
        continue
      self._logged.add(text)
      logging.warning("reward function failed on prompt %d: %s (logged once; repeats are only "
                      "counted)", index, text)

  def close(self):
    """Stops the workers."""
    self._stop_workers()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class ErrorStreak:
  """Stops a run once more than `max_frac` of a training step's reward calls fail (errors and
  timeouts) for `steps` steps in a row: a broken reward scores 0 everywhere, and the run would
  otherwise finish having learned nothing."""

  def __init__(self, max_frac: float, steps: int = 3):
    self.max_frac, self.steps, self._bad = max_frac, steps, 0

  def update(self, failed: int, calls: int, first_failure: Optional[str]):
    """Books a training step's `failed` of `calls`; raises `errors.RunStopped` on the
    `steps`-th bad step in a row, naming `first_failure` (this process's first)."""
    self._bad = self._bad + 1 if calls and failed / calls > self.max_frac else 0
    if self._bad >= self.steps:
      raise errors.RunStopped(
          f"reward function failed on {failed}/{calls} calls ({100 * failed / calls:.3g}%) for "
          f"{self._bad} steps in a row (data.reward_max_error_frac={self.max_frac}); first "
          f"error: {first_failure or 'none on this process'}")


def _worker_env() -> dict[str, str]:
  """The environment, plus the directory holding `minirl_jax` so `-m` finds it from any cwd."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(minirl_jax.__file__)))
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [os.environ.get("PYTHONPATH"), root]))}


def _death(process) -> str:
  """What a worker that closed its connection died of."""
  try:
    status = process.wait(timeout=1.0)
  except subprocess.TimeoutExpired:
    return "reward worker closed its connection"
  if status < 0:
    return f"reward worker killed by {signal.Signals(-status).name}"
  return f"reward worker exited with status {status}"


def _stop(process, conn):
  process.kill()
  process.wait()
  conn.close()


def _stop_all(workers):
  """Asks each worker to finish, killing any that does not (e.g. one stuck in a call)."""
  for process, conn in workers:
    try:
      conn.send(None)
    except OSError:
      pass
  for process, conn in workers:
    try:
      process.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
      pass
    _stop(process, conn)
  workers.clear()


def score_batch(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                answers: Sequence[str], timeout_s: float = 5.0, *,
                scorer: Optional[RewardScorer] = None) -> tuple[np.ndarray, dict[str, float]]:
  """Scores every (prompt, completion, answer) with `reward_fn`, each call bounded by `timeout_s`.

  A call that raises, returns anything but a number in [0, 1], crashes its worker or runs
  past `timeout_s` scores 0 and is counted; scoring never raises because of a completion.

  Args:
    reward_fn: picklable `R(prompt, completion, answer) -> float in [0, 1]`.
    prompts: prompt texts, one per completion.
    completions: decoded completions.
    answers: reference answers, one per completion.
    timeout_s: seconds allowed per call.
    scorer: a long-lived `RewardScorer` for `reward_fn` (the trainer keeps one to avoid
      starting worker processes every step); a temporary one is used if None.

  Returns:
    rewards: float32 [len(completions)].
    metrics: {"reward/errors": count, "reward/timeouts": count}.
  """
  if scorer is not None:
    if scorer.reward_fn is not reward_fn or scorer.timeout_s != timeout_s:
      raise ValueError("scorer was built for a different reward_fn or timeout_s")
    return scorer.score(prompts, completions, answers)
  with RewardScorer(reward_fn, timeout_s=timeout_s) as temporary:
    return temporary.score(prompts, completions, answers)
