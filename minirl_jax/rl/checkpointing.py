"""Everything a run reads from or writes to disk as orbax checkpoints:
- params directories and model directories (params + model_config.json: what
  scripts/convert_hf.py writes and `init_from` reads);
- a run's initial state: random, or `init_from`'s params with a fresh optimizer;
- training checkpoints: train state, progress and both grain iterators in one orbax step
  (`Manager`), and `load_run`: a workdir's latest state with the run's data, for the
  scripts that read a run (eval, sample, gap).
"""
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Optional

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from minirl_jax import errors
from minirl_jax import sharding
from minirl_jax.models import config as config_lib
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import keys
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_state

# A model directory (what scripts/convert_hf.py writes; `init_from` reads it).
PARAMS_DIR, MODEL_CONFIG = "params", "model_config.json"


def save_params(directory: str, params) -> None:
  """Writes a params pytree as an orbax checkpoint at `directory` (must not exist)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params)


def restore_params(directory: str, abstract_params: Optional[Any] = None):
  """Reads params written by `save_params`.

  Args:
    directory: the checkpoint directory.
    abstract_params: optional pytree of `jax.ShapeDtypeStruct` (with `.sharding` to restore
      straight onto a mesh, possibly of another shape than the one that saved it).
  """
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(directory), abstract_params)


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of a (possibly abstract) pytree, optionally with target shardings."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def save_model(directory: str, cfg: config_lib.ModelConfig, params) -> None:
  """Writes `directory/params` (see `save_params`) and `directory/model_config.json`."""
  os.makedirs(directory, exist_ok=True)
  save_params(os.path.join(directory, PARAMS_DIR), params)
  with open(os.path.join(directory, MODEL_CONFIG), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def check_model_dir(directory: str, field: str = "init_from") -> None:
  """Raises a one-line error unless `directory` holds what `save_model` writes."""
  if not os.path.isdir(directory):
    raise errors.MissingPath(f"{field}={directory} does not exist (a model directory: "
                             "scripts/convert_hf.py --out=DIR writes one)")
  for name in (MODEL_CONFIG, PARAMS_DIR):
    if not os.path.exists(os.path.join(directory, name)):
      raise errors.MissingPath(f"{field}={directory} is not a model directory: it has no "
                               f"{name} (scripts/convert_hf.py --out=DIR writes one)")


def read_model_config(directory: str, field: str = "init_from") -> config_lib.ModelConfig:
  """The ModelConfig `save_model` wrote to `directory` (named `field` in errors)."""
  check_model_dir(directory, field)
  with open(os.path.join(directory, MODEL_CONFIG), encoding="utf-8") as f:
    return config_lib.from_dict(json.load(f))


# The fields that make two ModelConfigs the same network (dtypes, remat etc. may differ).
ARCHITECTURE = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "num_experts", "top_k", "expert_ffn_dim", "dense_ffn_dim",
                "moe_layers_skip", "norm_topk_prob", "rope_theta", "tie_embeddings")


def check_same_model(saved, wanted, where):
  for field in ARCHITECTURE:
    if getattr(saved, field) != getattr(wanted, field):
      raise errors.UserError(f"model.{field} ({getattr(wanted, field)!r}) differs from the "
                             f"checkpoint's ({getattr(saved, field)!r}) in init_from={where}")


def initial_state(s: settings_lib.Settings, mesh, key):
  """The run's first TrainState on the mesh, for RL's optimizer: `s.init_from`'s params
  when set, else a random init; and its shardings."""
  if not s.init_from:
    return train_state.random_init(s, mesh, key)
  optimizer = train_state.optimizers(s).rl
  target = train_state.abstract_state(s, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, target)
  check_same_model(read_model_config(s.init_from), s.model, s.init_from)
  params = restore_params(os.path.join(s.init_from, PARAMS_DIR), target.params)
  return train_state.fresh_optimizer(params, optimizer, shardings), shardings


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
      except Exception as e:
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

  def steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def restore_step(self, step: int, state):
    """(state, Progress) of global step `step`, without the iterators."""
    return self._restore(step, state, None, None)

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
    target = abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
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


def read_latest(workdir: str, s, mesh, rl_step: Optional[int] = None):
  """The newest checkpoint of a training workdir (or the one at RL step `rl_step`),
  restored for settings `s` on `mesh`: (state, Progress), without its iterators.

  Raises errors.MissingPath (and creates nothing) when the workdir holds no checkpoint, or
  none at `rl_step`.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.MissingPath(f"no checkpoint under {os.path.abspath(directory)}")
  # Reading never saves, so it never prunes: keep every step whatever the config says.
  mngr = Manager(directory, dataclasses.replace(s.checkpoint, keep=10 ** 9), create=False)
  try:
    restored = mngr.restore_latest(train_state.abstract_state(s, mesh))
    if restored is not None and rl_step is not None and restored[1].rl_step != rl_step:
      step = restored[1].global_step - restored[1].rl_step + rl_step
      if step not in mngr.steps():
        raise errors.MissingPath(f"no checkpoint at RL step {rl_step} under {mngr.directory} "
                                 f"(steps saved: {sorted(mngr.steps())})")
      restored = mngr.restore_step(step, train_state.abstract_state(s, mesh))
  finally:
    mngr.close()
  if restored is None:
    raise errors.MissingPath(f"no checkpoint under {mngr.directory}")
  return restored


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A training run read back: its settings, mesh, data, and latest state."""
  s: settings_lib.Settings
  mesh: Any
  data: rl_data.RunData
  state: train_state.TrainState
  progress: Optional[Progress]  # None: the initial state (no workdir)


def load_run(config, workdir: Optional[str]) -> LoadedRun:
  """The settings of `config` (the one the run was trained with), its mesh and data, and
  the newest checkpoint of `workdir`; with no workdir, the run's initial state.

  Raises errors.MissingPath (and creates nothing) when the workdir holds no checkpoint.
  """
  s = settings_lib.from_config(config)
  mesh = sharding.make_mesh(s.mesh)
  data = rl_data.build(s)
  if workdir:
    state, progress = read_latest(workdir, s, mesh)
  else:
    state, _ = initial_state(s, mesh, keys.Keys.of(s.seed).init)
    progress = None
  return LoadedRun(s=s, mesh=mesh, data=data, state=state, progress=progress)
