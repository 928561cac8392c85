"""Runs the smoke job on fake CPU devices for `placement_test.py` and prints one JSON line.

  placement_child.py colocated WORKDIR       (4 devices: the trainer's mesh alone)
  placement_child.py disaggregated WORKDIR   (8 devices: 4 sample, 4 train)

Each runs max_staleness 0 and 1 and prints their metrics records; the disaggregated one
also checks, with k = 1, that step t's rollout is what the sampler makes from the weights of
step t - 2 (read back from the checkpoint), that the sampler's weights are bit-identical to
the trainer's quantised weights of the recorded version and live on the sampler's devices,
and that a run stopped by SIGTERM in step 2 resumes to the same records.
"""
import importlib.util
import json
import os
import pathlib
import signal
import sys

import jax
import numpy as np

from minirl_jax import errors
from minirl_jax.rl import checkpointing
from minirl_jax.rl import loop
from minirl_jax.rl import settings as settings_lib

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
STEPS = 4


def config(**overrides):
  spec = importlib.util.spec_from_file_location("smoke", CONFIGS / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  base = {"rl.steps": STEPS, "data.reward": "rewards_testlib:odd_length",
          "checkpoint.every": 1, "checkpoint.keep": 20, "log.plots": False,
          "objective.grad_cosine_every": 0}
  for key, value in {**base, **overrides}.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"stage": "rl"' in line]


def run(workdir, **overrides):
  r = loop.Run(settings_lib.from_config(config(**overrides)), workdir)
  r.run()
  return r, records(workdir)


def lag_and_weights(workdir) -> dict:
  """k = 1, disaggregated: the rollouts each step used, against the sampler that step's
  version's checkpointed weights make."""
  r = loop.Run(settings_lib.from_config(config(**{"rl.placement": "disaggregated",
                                                  "rl.max_staleness": 1})), workdir)
  sampled = {}
  r_start = r._start_rollouts

  def start():
    r_start()
    sample = r.rollouts._sample
    def recorded(params, prompts, key):
      rollout = sample(params, prompts, key)
      sampled[len(sampled) + 1] = (prompts, key, rollout)
      return rollout
    r.rollouts._sample = recorded
  r._start_rollouts = start
  r.run()
  out = {"sampler_devices": sorted(d.id for d in r.meshes.sampler.devices.flat),
         "trainer_devices": sorted(d.id for d in r.meshes.trainer.devices.flat)}
  # The weights the sampler holds now (version STEPS) against the trainer's, quantised.
  held = r.rollouts.weights[STEPS]
  mine = r.fns.quantize(r.state.params)
  out["weights_identical"] = all(
      np.array_equal(np.asarray(a), np.asarray(b)) and a.dtype == b.dtype
      for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(mine)))
  out["weights_on_sampler"] = all(
      {d.id for d in x.devices()} <= set(out["sampler_devices"]) for x in jax.tree.leaves(held))
  # Step t's rollout against a fresh one from the checkpoint of version t - 2.
  same = {}
  for step, (prompts, key, rollout) in sampled.items():
    version = max(0, step - 2)
    state, _ = checkpointing.read_latest(workdir, r.s, r.mesh, rl_step=version)
    fresh = r.fns.sample(r.publish(state.params), prompts, key)
    same[step] = bool(np.array_equal(np.asarray(fresh.tokens), np.asarray(rollout.tokens)))
  out["rollout_from_version_t_minus_2"] = same
  return out


def preempted_then_resumed(workdir, **overrides) -> list:
  r = loop.Run(settings_lib.from_config(config(**overrides)), workdir)
  rl_step = r._rl_step

  def preempted_in_step_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return rl_step(step)
  r._rl_step = preempted_in_step_2
  try:
    r.run()
  except errors.RunStopped:
    pass
  stopped_at = max(rec["step"] for rec in records(workdir))
  inflight_files = sorted(os.listdir(os.path.join(workdir, "inflight")))
  run(workdir, **overrides)
  return {"stopped_at": stopped_at, "inflight_files": inflight_files,
          "records": records(workdir)}


def main(mode, workdir):
  out = {"devices": len(jax.devices())}
  if mode == "colocated":
    for k in (0, 1):
      out[f"k{k}"] = run(os.path.join(workdir, f"k{k}"), **{"rl.max_staleness": k})[1]
  else:
    split = {"rl.placement": "disaggregated"}
    out["k0"] = run(os.path.join(workdir, "k0"), **split)[1]
    out["lag"] = lag_and_weights(os.path.join(workdir, "k1"))
    out["k1"] = records(os.path.join(workdir, "k1"))
    out["resumed"] = preempted_then_resumed(os.path.join(workdir, "resumed"), **split,
                                            **{"rl.max_staleness": 1})
  print(json.dumps(out))


if __name__ == "__main__":
  main(*sys.argv[1:])
