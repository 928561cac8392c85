"""The collapse criterion, fixed before any grid was run (docs/results/README.md), read by
the reports (`collapse_step` over a run's records) and by the main job as it runs
(`CollapseWatch`, which stops a run at its collapse under `rl.stop_on_collapse`).

A run collapses at the first RL step where (a) held-out accuracy falls below
ACCURACY_FRACTION of its running peak, once that peak is at least MIN_PEAK; or (b) policy
entropy falls below ENTROPY_FLOOR nats per token; or (c) a metric is not finite or an
update was skipped for a non-finite gradient. Step 0's accuracy (before any RL update) opens
the running peak.
"""
import math
from typing import Iterable, Mapping, Optional

ACCURACY_FRACTION = 0.5
MIN_PEAK = 0.1
ENTROPY_FLOOR = 0.02


class CollapseWatch:
  """Reads a run's RL records in step order; `step` is the step it collapsed at, or None."""

  def __init__(self):
    self.peak = 0.0
    self.step: Optional[int] = None

  def observe(self, step: int, record: Mapping[str, float]) -> Optional[int]:
    """Reads one RL step's metrics; returns the collapse step once there is one."""
    if self.step is None:
      if step == 0:
        self.peak = record.get("eval/accuracy", 0.0)
      elif self._fires(record):
        self.step = step
    return self.step

  def _fires(self, record: Mapping[str, float]) -> bool:
    if any(not math.isfinite(v) for v in record.values() if isinstance(v, float)):
      return True
    if record.get("optim/skipped", 0.0) > 0 or record.get("policy/entropy", 1.0) < ENTROPY_FLOOR:
      return True
    if "eval/accuracy" in record:
      accuracy = record["eval/accuracy"]
      if self.peak >= MIN_PEAK and accuracy < ACCURACY_FRACTION * self.peak:
        return True
      self.peak = max(self.peak, accuracy)
    return False

  def reason(self) -> str:
    return (f"held-out accuracy below {ACCURACY_FRACTION:g} x its running peak (once >= "
            f"{MIN_PEAK:g}), entropy below {ENTROPY_FLOOR:g} nats per token, a metric not "
            "finite or an update skipped")


def collapse_step(records: Iterable[Mapping]) -> Optional[int]:
  """The first RL step at which the run collapses (module docstring), or None."""
  watch = CollapseWatch()
  for r in records:
    if watch.observe(r["step"], r) is not None:
      break
  return watch.step
