"""Training checkpoints: train state, progress, and both grain iterators, in one orbax step."""
import dataclasses
import os
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp


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


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


class Manager:
  """An orbax CheckpointManager over (state, progress, sft iterator, rl iterator)."""

  def __init__(self, directory: str, cfg):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True),
        item_names=("state", "progress", "sft_data", "rl_data"))

  def save(self, progress: Progress, state, sft_iter, rl_iter, force: bool = False):
    self._mngr.save(progress.global_step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(dataclasses.asdict(progress)),
        sft_data=grain.checkpoint.CheckpointSave(sft_iter),
        rl_data=grain.checkpoint.CheckpointSave(rl_iter)))

  def restore_latest(self, state, sft_iter, rl_iter):
    """Restores the newest checkpoint into `state`'s shardings and the iterators in place.

    Returns:
      (state, Progress), or None when the directory has no checkpoint.
    """
    step = self._mngr.latest_step()
    if step is None:
      return None
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state)),
        progress=ocp.args.JsonRestore(),
        sft_data=grain.checkpoint.CheckpointRestore(sft_iter),
        rl_data=grain.checkpoint.CheckpointRestore(rl_iter)))
    return restored.state, Progress(**restored.progress)

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()
