"""A run's hold on its workdir: one process at a time, and a resume runs the same experiment.

`claim(workdir, s)` takes an exclusive lock on `workdir/run.lock` (an advisory `flock`, which
the kernel releases when the process ends, SIGKILL included, so a crashed run never leaves it
stuck) and compares `s` with the settings the run recorded (`workdir/settings.json`): a
resume whose config differs in a field that changes the experiment is refused before any
checkpoint is read, naming each field, old and new value.
"""
import dataclasses
import enum
import fcntl
import json
import os
from typing import Any, Optional

from minirl_jax import errors

LOCK, SETTINGS = "run.lock", "settings.json"

# What a resume may change: how long the run goes on, where it runs and how it is laid out,
# what it logs and keeps; never what it computes.
RESUMABLE = ("rl.steps", "rl.stop_on_collapse", "rl.no_signal_warn_steps",
             "rl.micro_batch_size", "sft.micro_batch_size", "sampler.slots", "model.remat",
             "model.moe_impl", "mesh.", "checkpoint.", "log.")


class Claim:
  """The lock on a workdir, held until `release` (or the process ends)."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, LOCK)
    self._file = open(self.path, "a+", encoding="utf-8")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "unknown"
      self._file.close()
      if holder == str(os.getpid()):
        holder += ", this one: close() the Run that holds it first"
      raise errors.UserError(
          f"workdir {os.path.abspath(workdir)} is in use by process {holder} (it holds "
          f"{LOCK}); wait for it to end or use another --workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"{os.getpid()}\n")
    self._file.flush()

  def release(self) -> None:
    if not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


def claim(workdir: str, settings, lead: bool = True) -> Optional[Claim]:
  """Locks `workdir` (the lead process only) and, when it holds checkpoints to resume,
  checks `settings` against the settings its run recorded (`record`).

  Raises:
    errors.UserError: another process holds the workdir, or the recorded settings differ
      in a field outside `RESUMABLE`.
  """
  held = Claim(workdir) if lead else None
  try:
    if has_checkpoints(workdir):
      check_same_settings(workdir, settings)
  except BaseException:
    if held:
      held.release()
    raise
  return held


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def record(workdir: str, settings) -> None:
  """Writes the settings a run goes on with (atomically: other processes may read it)."""
  path = os.path.join(workdir, SETTINGS)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(to_json(settings), f, indent=1)
  os.replace(path + ".tmp", path)


def check_same_settings(workdir: str, settings) -> None:
  """Refuses `settings` when they differ from the recorded ones outside `RESUMABLE`
  (a workdir without a record, e.g. a grid arm branched from a cold start, passes)."""
  path = os.path.join(workdir, SETTINGS)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  changed = [(field, old, new) for field, old, new in differences(saved, to_json(settings))
             if not field.startswith(RESUMABLE)]
  if changed:
    listed = "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in changed)
    raise errors.UserError(
        f"the config differs from the one the run in {os.path.abspath(workdir)} was started "
        f"with ({SETTINGS}), field: saved -> now: {listed}. Resume with the run's config or "
        "use another --workdir")


def to_json(settings) -> dict[str, Any]:
  """Settings as plain JSON values (tuples as lists, enumerations as their strings)."""
  def plain(value):
    if isinstance(value, enum.Enum):
      return value.value
    raise TypeError(f"not JSON: {value!r}")
  return json.loads(json.dumps(dataclasses.asdict(settings), default=plain))


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, old value, new value) for every leaf that differs, in field order."""
  out = []
  for key in list(old) + [k for k in new if k not in old]:
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append((f"{prefix}{key}", a, b))
  return out
