"""Training checkpoints: train state, progress, and both grain iterators, in one orbax step."""
import dataclasses
import os
import shutil
import time
from typing import Optional

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from minirl_jax import checkpoint
from minirl_jax import errors
from minirl_jax.rl import state as state_lib

ITEMS = ("state", "progress", "sft_data", "rl_data")


@dataclasses.dataclass
class Progress:
  """Where a run is; saved with every checkpoint (JSON)."""
  sft_step: int = 0
  sft_done: bool = False
  rl_step: int = 0
  start_accuracy: Optional[float] = None  # held-out accuracy when RL started

  @property
  def global_step(self) -> int:
    return self.sft_step + self.rl_step


class Manager:
  """An orbax CheckpointManager over (state, progress, sft iterator, rl iterator)."""

  def __init__(self, directory: str, cfg, create: bool = True):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep,
                                                             create=create),
        item_names=ITEMS)

  def save(self, progress: Progress, state, sft_iter, rl_iter):
    """Saves at `progress.global_step` (every call is a save: the loop decides when);
    a step already saved is left as it is."""
    if progress.global_step in self._mngr.all_steps():
      return
    self._mngr.save(progress.global_step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(dataclasses.asdict(progress)),
        sft_data=grain.checkpoint.CheckpointSave(sft_iter),
        rl_data=grain.checkpoint.CheckpointSave(rl_iter)))

  def restore_latest(self, state, sft_iter=None, rl_iter=None):
    """Restores the newest checkpoint that restores into `state`'s shardings (concrete or
    abstract) and, when given, the iterators in place.

    A checkpoint that fails while an older one restores is damaged (truncated or missing
    files): each is reported in one line and moved aside to `<dir>_damaged/`, nothing
    deleted. When none restores, nothing is moved (a config that does not match the
    checkpoints fails every step alike).

    Returns:
      (state, Progress), or None when the directory has no checkpoint.
    Raises:
      errors.UserError: checkpoints exist but none restores; names the newest one's error.
    """
    failed = []
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        restored = self._restore(step, state, sft_iter, rl_iter)
      except Exception as e:  # pylint: disable=broad-exception-caught
        failed.append((step, e))
        continue
      for bad_step, error in failed:
        logging.warning("checkpoint %d failed to restore (%s); moved to %s; resumed from %d",
                        bad_step, _one_line(error), self._move_aside(bad_step), step)
      return restored
    if failed:
      step, error = failed[0]
      raise errors.UserError(f"no checkpoint under {self.directory} restores; the newest "
                             f"(step {step}): {_one_line(error)}") from error
    return None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _move_aside(self, step: int) -> str:
    """Keeps a damaged step for inspection where orbax no longer sees it."""
    target = os.path.join(f"{self.directory}_damaged", f"{step}_{int(time.time())}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(self._step_dir(step), target)
    self._mngr.reload()
    return target

  def _restore(self, step, state, sft_iter, rl_iter):
    target = checkpoint.abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
    items = dict(state=ocp.args.StandardRestore(target),
                 progress=ocp.args.JsonRestore())
    if sft_iter is not None:
      items["sft_data"] = grain.checkpoint.CheckpointRestore(sft_iter)
    if rl_iter is not None:
      items["rl_data"] = grain.checkpoint.CheckpointRestore(rl_iter)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return restored.state, Progress(**restored.progress)

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def _one_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def read_latest(workdir: str, s, mesh):
  """The newest checkpoint of a training workdir, restored for settings `s` on `mesh`:
  (state, Progress), without its iterators.

  Raises errors.MissingPath (and creates nothing) when the workdir holds no checkpoint.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.MissingPath(f"no checkpoint under {os.path.abspath(directory)}")
  mngr = Manager(directory, s.checkpoint, create=False)
  try:
    restored = mngr.restore_latest(state_lib.abstract_state(s, mesh))
  finally:
    mngr.close()
  if restored is None:
    raise errors.MissingPath(f"no checkpoint under {mngr.directory}")
  return restored
