"""Scoring completions with a reward function in worker processes, each call under a timeout.

A call that raises, returns anything but a number in [0, 1], crashes its worker or runs past
its timeout scores 0 and is counted; scoring never raises because of a completion.
"""
import importlib
import math
import multiprocessing
import pickle
import time
from collections.abc import Sequence
from multiprocessing import connection
from typing import Optional

import numpy as np

from minirl_jax.data.rewards import RewardFn
from minirl_jax.data.rewards import math_reward


def _worker_main(conn, reward_fn, preload):
  """Scores (index, prompt, completion, answer) calls from `conn` until it receives None."""
  for module in preload:  # slow imports happen before "ready", outside any call's timeout
    try:
      importlib.import_module(module)
    except ImportError:
      pass
  conn.send("ready")
  while (calls := conn.recv()) is not None:
    for index, prompt, completion, answer in calls:
      try:
        conn.send((index, "ok", reward_fn(prompt, completion, answer)))
      except Exception as e:  # pylint: disable=broad-exception-caught
        conn.send((index, "error", f"{type(e).__name__}: {e}"))


class RewardScorer:
  """Scores completions in worker processes, killing any call that runs past `timeout_s`.

  Processes, not threads: a thread cannot be stopped, and a reward call stuck in C code
  (e.g. sympy evaluating 9^{9^{9^9}} inside math-verify) holds the GIL and freezes every
  thread, the caller's included; SIGALRM timeouts only work on the main thread. A worker is
  killed and replaced on timeout or crash. Workers are spawned (never forked: JAX is
  multithreaded), so `reward_fn` must be picklable, e.g. a module-level function.
  """

  def __init__(self, reward_fn: RewardFn, *, timeout_s: float = 5.0, num_workers: int = 1,
               preload: Optional[Sequence[str]] = None, startup_timeout_s: float = 120.0):
    try:
      pickle.dumps(reward_fn)
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
    self._context = multiprocessing.get_context("spawn")
    self._workers = [self._start_worker() for _ in range(num_workers)]

  def _start_worker(self):
    parent, child = self._context.Pipe()
    process = self._context.Process(
        target=_worker_main, args=(child, self.reward_fn, self._preload), daemon=True)
    process.start()
    child.close()
    try:
      if not parent.poll(self._startup_timeout_s):
        raise TimeoutError(f"not ready after {self._startup_timeout_s} s")
      parent.recv()
    except (EOFError, OSError, TimeoutError) as e:
      process.kill()
      raise RuntimeError(f"reward worker for {self.reward_fn!r} failed to start ({e!r}); a "
                         "spawned process must be able to import reward_fn by its module name") from e
    return process, parent

  def _replace_worker(self, slot: int):
    process, conn = self._workers[slot]
    process.kill()
    process.join()
    conn.close()
    self._workers[slot] = self._start_worker()

  def score(self, prompts: Sequence[str], completions: Sequence[str],
            answers: Sequence[str]) -> tuple[np.ndarray, dict[str, float]]:
    """Scores a batch; see `score_batch`."""
    if not len(prompts) == len(completions) == len(answers):
      raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(completions)} completions, "
                       f"{len(answers)} answers")
    calls = [(i, str(p), str(c), str(a)) for i, (p, c, a) in enumerate(zip(prompts, completions, answers))]
    rewards = np.zeros(len(calls), np.float32)
    counts = {"errors": 0, "timeouts": 0}
    # Each worker takes a contiguous chunk and streams back one result per call; a call's
    # clock starts when the previous result of its worker arrives.
    chunks = np.array_split(np.arange(len(calls)), len(self._workers))
    pending = {slot: [calls[i] for i in chunk] for slot, chunk in enumerate(chunks) if len(chunk)}
    for slot, chunk in pending.items():
      self._workers[slot][1].send(chunk)
    started = {slot: time.monotonic() for slot in pending}
    while pending:
      self._collect(pending, started, rewards, counts)
    return rewards, {"reward/errors": float(counts["errors"]), "reward/timeouts": float(counts["timeouts"])}

  def _collect(self, pending, started, rewards, counts):
    """Waits for the next result or deadline and books it."""
    conn_slot = {self._workers[slot][1]: slot for slot in pending}
    deadline = min(started.values()) + self.timeout_s
    for conn in connection.wait(list(conn_slot), timeout=max(0.0, deadline - time.monotonic())):
      slot = conn_slot[conn]
      try:
        index, status, value = conn.recv()
      except (EOFError, OSError):  # the worker died mid-call
        self._fail_current(slot, pending, started, counts, "errors")
        continue
      reward = _valid_reward(value) if status == "ok" else None
      if reward is None:
        counts["errors"] += 1
      else:
        rewards[index] = reward
      self._advance(slot, pending, started)
    now = time.monotonic()
    for slot in [s for s in pending if now - started[s] >= self.timeout_s]:
      self._fail_current(slot, pending, started, counts, "timeouts")

  def _advance(self, slot, pending, started):
    pending[slot] = pending[slot][1:]
    started[slot] = time.monotonic()
    if not pending[slot]:
      del pending[slot], started[slot]

  def _fail_current(self, slot, pending, started, counts, kind):
    counts[kind] += 1
    self._replace_worker(slot)
    self._advance(slot, pending, started)
    if slot in pending:
      self._workers[slot][1].send(pending[slot])

  def close(self):
    """Stops the workers."""
    for process, conn in self._workers:
      try:
        conn.send(None)
      except (BrokenPipeError, OSError):
        pass
      process.join(timeout=1.0)
      if process.is_alive():
        process.kill()
        process.join()
      conn.close()
    self._workers = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _valid_reward(value) -> Optional[float]:
  """The reward as a float if it is a real number in [0, 1], else None."""
  if isinstance(value, (bool, int, float, np.integer, np.floating)):
    value = float(value)
    if math.isfinite(value) and 0.0 <= value <= 1.0:
      return value
  return None


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
