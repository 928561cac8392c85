"""Rollouts sampled ahead of the trainer (`rl.max_staleness` = k, docs/placement.md).

Step t's rollout is sampled with the weights of step v(t) = max(0, t - 1 - k): the sampler
can start step t + k's rollout as soon as step t - 1's update is published, so with its own
devices it generates while the trainer updates (JAX dispatches both asynchronously; the
decode loop runs on device). k = 0 is the synchronous loop. The lag is fixed, not "at most":
a run is the same whatever the two sides' speeds, so it is reproducible and resumes exactly.

A checkpoint after step s holds the rollouts already dispatched for steps s + 1 .. s + k
(prompts, tokens, mu, routing and the version that made them) beside the trainer's state,
and the trainer's weights of the versions their staleness metrics compare against; a
resume hands them back instead of sampling again.
"""
import dataclasses
import os
from typing import Any, Callable, Optional

import jax
from jax.flatten_util import ravel_pytree
import numpy as np

from minirl_jax.sampling import sampler as sampler_lib


def version_for(step: int, max_staleness: int) -> int:
  """The weights (the RL step whose update made them; 0: the cold start) that sample step
  `step`'s rollout."""
  return max(0, step - 1 - max_staleness)


class Rollouts:
  """The sampler's queue: published weight versions and the rollouts dispatched ahead."""

  def __init__(self, max_staleness: int, sample: Callable, prompts: Any, key_for: Callable):
    """sample: (sampler_params, prompts, key) -> Rollout; prompts: the RL prompt iterator;
    key_for: RL step -> its sampling key."""
    self.k, self._sample, self._prompts, self._key_for = max_staleness, sample, prompts, key_for
    self.weights: dict[int, Any] = {}  # version -> sampler params
    self.pending: dict[int, tuple[dict, Any, int]] = {}  # step -> (prompts, rollout, version)

  def publish(self, version: int, sampler_params) -> None:
    """The weights of `version`, from now on; versions no step will sample with again are
    dropped."""
    self.weights[version] = sampler_params
    for old in [v for v in self.weights if v < version - self.k]:
      del self.weights[old]

  def dispatch_through(self, last_step: int, first_step: int) -> None:
    """Dispatches (asynchronously) every step's rollout from `first_step` to `last_step`
    not yet pending, in order."""
    for step in range(max(first_step, max(self.pending, default=first_step - 1) + 1),
                      last_step + 1):
      version = version_for(step, self.k)
      prompts = next(self._prompts)
      rollout = self._sample(self.weights[version], prompts, self._key_for(step))
      self.pending[step] = (prompts, rollout, version)

  def take(self, step: int) -> tuple[dict, Any, int]:
    """(prompts, rollout, version) of `step`, removed from the queue."""
    return self.pending.pop(step)


def _path(directory: str, global_step: int) -> str:
  return os.path.join(directory, f"{global_step}.npz")


def save(directory: str, global_step: int, pending: dict, versions: dict, kept_steps) -> None:
  """Writes the pending rollouts of the checkpoint at `global_step` (waits for them) and
  the trainer's weights of the older versions (flattened; k copies of the weights, which
  the staleness metrics of the next k steps read), and removes the files of checkpoints
  no longer kept."""
  os.makedirs(directory, exist_ok=True)
  arrays = {f"versions/{v}": np.asarray(ravel_pytree(jax.device_get(p))[0])
            for v, p in versions.items()}
  for step, (prompts, rollout, version) in pending.items():
    arrays[f"{step}/version"] = np.asarray(version)
    for name, value in prompts.items():
      arrays[f"{step}/prompts/{name}"] = np.asarray(value)
    fields = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
    for name, value in jax.device_get(fields).items():
      arrays[f"{step}/rollout/{name}"] = np.asarray(value)
  if jax.process_index() == 0:
    tmp = _path(directory, global_step) + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, _path(directory, global_step))
    for name in os.listdir(directory):
      stem = name.split(".")[0]
      if stem.isdigit() and int(stem) not in set(kept_steps) | {global_step}:
        os.remove(os.path.join(directory, name))


def restore(directory: str, global_step: int, place: Callable, params_like) -> Optional[tuple]:
  """(pending rollouts, {version: weights}) saved with checkpoint `global_step`; None if
  no file. Each rollout is placed by `place` (host Rollout -> device Rollout), each
  version's weights like `params_like` (its structure, dtypes and shardings)."""
  path = _path(directory, global_step)
  if not os.path.exists(path):
    return None
  pending: dict[int, list] = {}
  versions = {}
  _, unravel = ravel_pytree(params_like)
  with np.load(path, allow_pickle=False) as f:
    for key in f.files:
      if key.startswith("versions/"):
        versions[int(key.split("/")[1])] = jax.tree.map(
            lambda x, like: jax.device_put(x.astype(like.dtype), like.sharding),
            unravel(f[key]), params_like)
        continue
      step, kind, *name = key.split("/")
      entry = pending.setdefault(int(step), [{}, {}, None])
      if kind == "version":
        entry[2] = int(f[key])
      else:
        entry[0 if kind == "prompts" else 1][name[0]] = f[key]
  return ({step: (prompts, place(sampler_lib.Rollout(**rollout)), version)
           for step, (prompts, rollout, version) in sorted(pending.items())}, versions)
