"""Training checkpoints: train state, progress, and both grain iterators, in one orbax step."""
import dataclasses
import os
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp

from minirl_jax import checkpoint

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

  def save(self, progress: Progress, state, sft_iter, rl_iter, force: bool = False):
    self._mngr.save(progress.global_step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(dataclasses.asdict(progress)),
        sft_data=grain.checkpoint.CheckpointSave(sft_iter),
        rl_data=grain.checkpoint.CheckpointSave(rl_iter)))

  def restore_latest(self, state, sft_iter=None, rl_iter=None):
    """Restores the newest checkpoint into `state`'s shardings (concrete or abstract) and,
    when given, the iterators in place.

    Returns:
      (state, Progress), or None when the directory has no checkpoint.
    """
    step = self._mngr.latest_step()
    if step is None:
      return None
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


def read_latest(workdir: str, cfg, abstract_state):
  """The newest checkpoint of a training workdir: (state, Progress), without its iterators.

  Raises FileNotFoundError (and creates nothing) when the workdir holds no checkpoint.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint under {os.path.abspath(directory)}")
  mngr = Manager(directory, cfg, create=False)
  try:
    restored = mngr.restore_latest(abstract_state)
  finally:
    mngr.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {mngr.directory}")
  return restored
