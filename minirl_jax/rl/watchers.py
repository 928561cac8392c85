"""What the main job watches beside its steps: the phase clock, stop signals, and the watchers
of its metrics records (skipped updates, steps without learning signal, collapse).

A `Watcher` reads every record the loop writes, `observe(stage, step, record)`, and picks
the ones it counts. A resumed run rebuilds each watcher the same way (`Watcher.resume`): it
replays the records kept in metrics.jsonl, quietly, then takes process 0's state, since
process 0 alone holds that file.
"""
import signal
import threading
import time
from typing import Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax.rl import train_state


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


def from_process_0(values) -> np.ndarray:
  """`values` as process 0 has them, on every process."""
  values = np.asarray(values, np.float64)
  return multihost_utils.broadcast_one_to_all(values) if jax.process_count() > 1 else values


class Watcher:
  """Reads the run's metrics records in the order they are written."""

  def observe(self, stage: str, step: int, record: dict, quiet: bool = False) -> None:
    """Reads one record ("sft" or "rl" stage); `quiet`: replayed on resume, so nothing is
    logged and nothing stops the run (it did not stop there)."""
    raise NotImplementedError

  def state(self) -> tuple[float, ...]:
    """The numbers a resumed run must carry on from."""
    raise NotImplementedError

  def set_state(self, values: Sequence[float]) -> None:
    raise NotImplementedError

  def resume(self, records: Sequence[dict]) -> None:
    """The state after `records` (the kept metrics.jsonl; [] on processes but 0), as an
    uninterrupted run has it. Every process calls it: the state is broadcast."""
    for r in records:
      self.observe(r["stage"], r["step"], r, quiet=True)
    self.set_state(from_process_0(self.state()))


class SkipGuard(Watcher):
  """Counts updates in a row that were skipped as not finite (`train_state.GUARDED`), over
  both stages; at `limit` the run stops, naming the step and the first quantity that was not
  finite."""

  def __init__(self, limit: int):
    self.limit, self.in_a_row = limit, 0

  def observe(self, stage: str, step: int, record: dict, quiet: bool = False) -> None:
    if stage == "rl" and step == 0:
      return  # RL step 0 evaluates; it updates nothing
    if not record.get("optim/skipped", 0.0) > 0:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    if quiet:
      return
    first = next((q for q in train_state.GUARDED
                  if record.get(f"optim/nonfinite_{q}", 0.0) > 0), "update")
    logging.warning("%s step %d: %s not finite, update skipped (%d in a row)", stage, step,
                    first, self.in_a_row)
    if self.in_a_row >= self.limit:
      raise errors.RunStopped(
          f"{stage} step {step}: {self.in_a_row} updates in a row were skipped because the "
          f"{first} was not finite (optim.max_skipped_in_a_row={self.limit}); nothing was "
          "saved after the last finite checkpoint. Lower the learning rate or check the data")

  def state(self) -> tuple[float, ...]:
    return (self.in_a_row,)

  def set_state(self, values: Sequence[float]) -> None:
    self.in_a_row = int(values[0])


class NoSignalWatch(Watcher):
  """Counts RL steps without learning signal: every group's rewards were equal
  (`reward/zero_adv_frac` = 1), so every advantage was 0 and the update learned nothing.
  One warning names them when `warn_after` such steps in a row have passed, and again at
  each doubling of the streak (2x, 4x, ...): a collapsed run says so without a line every
  few steps."""

  def __init__(self, warn_after: int):
    self.warn_after, self.in_a_row, self.total = warn_after, 0, 0

  def observe(self, stage: str, step: int, record: dict, quiet: bool = False) -> None:
    if stage != "rl" or step == 0:
      return
    if record.get("reward/zero_adv_frac", 0.0) < 1:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    periods, rest = divmod(self.in_a_row, self.warn_after)
    if not quiet and not rest and periods & (periods - 1) == 0:
      logging.warning(
          "RL steps %d-%d had no learning signal: in each, every group's rewards were "
          "equal, so every advantage was 0 (rl.no_signal_warn_steps=%d). Check the reward "
          "(always the same?) and the learning rate (a broken model scores 0 everywhere)",
          step - self.in_a_row + 1, step, self.warn_after)

  def state(self) -> tuple[float, ...]:
    return self.in_a_row, self.total

  def set_state(self, values: Sequence[float]) -> None:
    self.in_a_row, self.total = (int(v) for v in values)

  def summarize(self, rl_steps: int) -> None:
    if rl_steps and self.total == rl_steps:
      logging.warning("No RL step had a learning signal (%d of %d): every group's rewards "
                      "were equal in each, so RL learned nothing", self.total, rl_steps)


class CollapseStop(Watcher):
  """The collapse criterion (`collapse.CollapseWatch`) read as the run goes: a warning at
  the step it fires; under `stop` (rl.stop_on_collapse) the run ends there, and a resumed
  run stopped at its collapse stays stopped."""

  def __init__(self, stop: bool):
    self.stop, self.watch = stop, collapse.CollapseWatch()

  @property
  def step(self) -> Optional[int]:
    """The RL step the run collapsed at, or None."""
    return self.watch.step

  @property
  def stopped(self) -> bool:
    return self.stop and self.watch.step is not None

  def observe(self, stage: str, step: int, record: dict, quiet: bool = False) -> None:
    if stage != "rl":
      return
    # Numbers only, as Python floats: the criterion's finiteness check reads floats.
    numbers = {k: float(v) for k, v in record.items() if not isinstance(v, str)}
    if self.watch.observe(step, numbers) == step and not quiet:
      logging.warning("RL step %d: the run collapsed by the stated criterion (%s)%s", step,
                      self.watch.reason(), "; it stops here (rl.stop_on_collapse)"
                      if self.stop else "")

  def state(self) -> tuple[float, ...]:
    return self.watch.peak, -1 if self.watch.step is None else self.watch.step

  def set_state(self, values: Sequence[float]) -> None:
    peak, step = values
    self.watch.peak, self.watch.step = float(peak), None if step < 0 else int(step)
