"""Where the sampler and the trainer run (`rl.placement`, docs/placement.md).

colocated: one mesh; the sampler uses the trainer's devices in turn with it.
disaggregated: the first `rl.sampler_devices` devices (half by default) form the sampler's
mesh (`sampler_mesh` axes), the rest the trainer's (`mesh` axes). After each update the
trainer's weights are quantised on the trainer's devices (the quantised tree is the smaller
one to move: int8 / fp8 / int4 against float32) and placed on the sampler's mesh with the
sampler's sharding; rollouts go the other way, their rows sharded over the trainer's batch
axes. One process: with several, `jax.devices()` spans hosts and the split must follow
host boundaries (docs/placement.md says what that needs).
"""
import dataclasses
from typing import Any

import jax

from minirl_jax import errors
from minirl_jax import sharding
from minirl_jax.rl import programs
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl.settings import Placement


@dataclasses.dataclass(frozen=True)
class Meshes:
  trainer: jax.sharding.Mesh
  sampler: jax.sharding.Mesh

  @property
  def disaggregated(self) -> bool:
    return self.trainer is not self.sampler


def _check(axes, devices, field: str) -> None:
  try:
    sharding.mesh_sizes(axes, len(devices))
  except errors.UserError as e:
    raise errors.UserError(f"{field}: {e}") from None


def meshes(s: settings_lib.Settings, devices=None) -> Meshes:
  """The trainer's and the sampler's meshes; one mesh when colocated.

  Raises errors.UserError naming the field when the split leaves a side without devices or
  a side's axes do not divide its devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if s.rl.placement is Placement.COLOCATED:
    mesh = sharding.make_mesh(s.mesh, devices)
    return Meshes(mesh, mesh)
  if jax.process_count() > 1:
    raise errors.UserError(f"rl.placement=disaggregated runs in one process; this job has "
                           f"{jax.process_count()} (docs/placement.md, 'Several processes')")
  if len(devices) < 2:
    raise errors.UserError(f"rl.placement=disaggregated needs at least 2 devices (one to "
                           f"sample, one to train), found {len(devices)}")
  n = s.rl.sampler_devices or len(devices) // 2
  if n >= len(devices):
    raise errors.UserError(f"rl.sampler_devices ({n}) must leave the trainer at least one of "
                           f"the {len(devices)} devices")
  _check(s.sampler_mesh, devices[:n], "sampler_mesh")  # both named before either is built
  _check(s.mesh, devices[n:], "mesh")
  return Meshes(trainer=sharding.make_mesh(s.mesh, devices[n:]),
                sampler=sharding.make_mesh(s.sampler_mesh, devices[:n]))


def sampler_shardings(s: settings_lib.Settings, abstract_params, mesh) -> Any:
  """The sampler's weights' shardings on its own mesh (`programs.sampler_params`)."""
  return jax.tree.map(lambda x: x.sharding, programs.sampler_params(abstract_params, s, mesh))


def to_sampler(sampler_params, shardings):
  """Quantised weights (on the trainer's devices) placed on the sampler's."""
  return jax.device_put(sampler_params, shardings)


SAMPLER_PHASES = ("sample",)
TRAINER_PHASES = ("score", "pi_old", "train", "publish")


def overlap(phase_s: dict[str, float]) -> dict[str, float]:
  """What overlapping would buy, from one synchronous step's phase times (seconds, keyed
  by `time/<phase>_s`'s phase): the sampler's work (sampling) and the trainer's (scoring,
  pi_old, the update, publishing the weights) run one after the other synchronously, side
  by side with `rl.max_staleness` >= 1 on disjoint devices, where the step takes the
  longer of the two and the other side waits the difference (an estimate: transfers and
  host work beyond these phases are not in it)."""
  sampler = sum(phase_s[p] for p in SAMPLER_PHASES)
  trainer = sum(phase_s[p] for p in TRAINER_PHASES)
  overlapped = max(sampler, trainer)
  return {"sampler_s": sampler, "trainer_s": trainer, "synchronous_s": sampler + trainer,
          "overlapped_s": overlapped, "sampler_idle_s": overlapped - sampler,
          "trainer_idle_s": overlapped - trainer,
          "speedup": (sampler + trainer) / overlapped if overlapped else float("nan")}
