"""Compiles every program of a run with XLA:TPU on this host, which has no TPU (needs libtpu:
pip install -e '.[tpu]').

  python scripts/compile.py                                   # tiny, on a 4-chip v5p
  python scripts/compile.py --config=configs/qwen3_30b_a3b_math.py:v5p   # its v5p-256 slice
  python scripts/compile.py --config=configs/moe_1b.py --topology=v5p:1x1x1 --programs=rl_step

The slice is --topology, else the config's `hardware.topology`. Per program and device:
XLA:TPU's memory (arguments, outputs, temporaries, aliased, the peak), the FLOPs and HBM bytes
counted from the compiled module with loop trip counts (minirl_jax/hlo_cost.py), the
compiler's own counts and `optimal_seconds` (each loop body once), and a roofline time at the
chip's published peaks, each op at its own roofline; beside the compiler's peak, the memory
plan's (scripts/plan.py); each program's slowest ops. Then one RL step estimated from them
(update MFU, decode tokens/s and HBM-bandwidth utilisation), and one JSON line. Every time is
an estimate; memory is the compiler's. A program that does not fit is one line, exit 2.
"""
import dataclasses
import json
import math

from absl import flags

from minirl_jax import aot
from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax import plan
from minirl_jax import roofline
from minirl_jax import sharding
from minirl_jax.rl import placement
from minirl_jax.rl import programs
from minirl_jax.rl import settings
from minirl_jax.sampling import sampler as sampler_lib

_CONFIG = config_base.define_config_flag(__file__)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:2x2x1, v5e:4x4, "
                                "v6e:4x4 (default: config.hardware.topology).")
_PROGRAMS = flags.DEFINE_list("programs", None, "Compile only these programs (rl_step, "
                              "pi_old, prefill, start, decode, sft_step); default: all.")
_SLOWEST = flags.DEFINE_integer("slowest", 3, "Print this many of each program's slowest "
                                "ops by the roofline (up to aot.SLOWEST).")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  config = _CONFIG.value
  topology = _TOPOLOGY.value or dict(config.get("hardware", {})).get("topology", "v5p:2x2x1")
  s = settings.from_config(config)
  meshes = placement.meshes(s, devices=aot.topology_devices(topology))
  mesh = meshes.trainer
  built = programs.build(s, mesh, meshes.sampler if meshes.disaggregated else None)
  compiled = aot.compile_all(built, mesh, _PROGRAMS.value)
  chip = aot.chip_of(mesh.devices.flat[0])
  where = (f"trainer mesh {dict(mesh.shape)} on {mesh.devices.size} chips, sampler mesh "
           f"{dict(meshes.sampler.shape)} on {meshes.sampler.devices.size}"
           if meshes.disaggregated else f"mesh {dict(mesh.shape)}")
  print(f"{topology} ({chip.name}, {len(aot.topology_devices(topology))} chips); {where}")
  planned = planned_peaks(s, meshes)
  mib = lambda b: f"{b / 2 ** 20:10.1f}"
  print("per chip, MiB:" + " " * 5 + "args   outputs     temps   aliased      peak      plan"
        "        GFLOP          GB  roofline s  compiler s")
  for name, c in compiled.items():
    plan_mib = mib(planned[name]) if name in planned else f"{'-':>10}"
    print(f"{name:<10}{mib(c.arguments)}{mib(c.outputs)}{mib(c.temporaries)}{mib(c.aliased)}"
          f"{mib(c.peak)}{plan_mib}{c.flops / 1e9:13.1f}{c.bytes / 1e9:12.2f}"
          f"{c.roofline_seconds:12.3e}{c.optimal_seconds:12.3e}")
  if _SLOWEST.value:
    print("slowest ops by the roofline (share of the program's roofline seconds):")
    for name, c in compiled.items():
      for label, seconds in c.slowest[:_SLOWEST.value]:
        print(f"  {name:<10}{seconds / c.roofline_seconds:7.1%}  {label}")
  step = step_estimate(s, compiled, chip, meshes, built["decode"].args)
  for line in step.pop("lines"):
    print(line)
  print(json.dumps({"topology": topology, "chip": chip.name, "mesh": dict(mesh.shape),
                    "sampler_mesh": dict(meshes.sampler.shape),
                    "programs": {n: {**dataclasses.asdict(c), "peak": c.peak}
                                 for n, c in compiled.items()},
                    "plan": planned,
                    **step}))


def planned_peaks(s, meshes: placement.Meshes) -> dict[str, int]:
  """The memory plan's bytes of each program by its compiled name (scripts/plan.py), each
  on the chips and axes it runs on."""
  trainer = plan.make(s, meshes.trainer.devices.size, "tpu").programs
  sampler = plan.make(dataclasses.replace(s, mesh=s.sampler_mesh),
                      meshes.sampler.devices.size, "tpu").programs if (
                          meshes.disaggregated) else trainer
  return {"rl_step": trainer["train_step"], "pi_old": trainer["pi_old"],
          "decode": sampler["decode"]}


def step_estimate(s, compiled, chip, meshes: placement.Meshes, decode_args) -> dict:
  """One RL step from the programs' roofline times (a lower bound on each): the rollout with
  every response at the full budget (`decode` is one loop iteration, counted once), pi_old,
  and N updates. The update's MFU is the model's FLOPs (`roofline.train_flops`) over that
  time at peak; decode's bandwidth utilisation is the bytes a step must read (every weight
  but the embedding, and the whole KV cache: `roofline.decode_bytes`, as bench_device.py
  measures it) over the sampler's chips' HBM bandwidth for that time. Disaggregated, the
  step is estimated both ways (`placement.overlap`): synchronous, and overlapped
  (rl.max_staleness >= 1), where the longer side sets the pace."""
  mesh = meshes.trainer
  chips, sampler_chips = mesh.devices.size, meshes.sampler.devices.size
  r = lambda name: compiled[name].roofline_seconds if name in compiled else 0.0
  slots = sampler_lib.num_slots(s.sampler, s.rl.global_batch,
                                sharding.batch_size_multiple(meshes.sampler))
  iterations = s.sampler.max_new_tokens * math.ceil(s.rl.global_batch / slots)
  rollout = r("prefill") + r("start") + r("decode") * iterations
  update = r("rl_step") * s.rl.num_minibatches
  model_flops = roofline.train_flops(s.model, s.rl.mini_batch_size,
                                     programs.sequence_length(s)) / chips
  mfu = model_flops / (r("rl_step") * chip.flops) if "rl_step" in compiled else math.nan
  parts = [f"rollout {rollout:.3g} s ({iterations} decode iterations at the full budget)"
           if "decode" in compiled else "",
           f"pi_old {r('pi_old'):.3g} s" if "pi_old" in compiled else "",
           f"{s.rl.num_minibatches} update(s) {update:.3g} s; update MFU <= {mfu:.1%}"
           if "rl_step" in compiled else ""]  # only the programs compiled
  lines = ["RL step estimate (rooflines, lower bounds): " + ", ".join(p for p in parts if p)]
  out = {"step_seconds": rollout + r("pi_old") + update, "rollout_seconds": rollout,
         "update_seconds": update, "update_mfu": mfu}
  if "decode" in compiled:
    weights, carry, _ = decode_args
    must_read = roofline.decode_bytes(weights, carry.cache)
    out["decode_tokens_per_second"] = slots / r("decode")
    out["decode_bandwidth_utilisation"] = must_read / (
        r("decode") * sampler_chips * chip.hbm_bandwidth)
    lines.append(f"decode: {out['decode_tokens_per_second']:,.0f} tokens/s on the slice "
                 f"({slots} rows a step), {out['decode_bandwidth_utilisation']:.1%} of HBM "
                 f"bandwidth reading what a step must ({must_read / 2 ** 30:.1f} GiB: weights "
                 "but the embedding, and the KV cache)")
  if meshes.disaggregated and {"decode", "rl_step"} <= set(compiled):
    est = placement.overlap({"sample": rollout, "score": 0.0, "pi_old": r("pi_old"),
                             "train": update, "publish": 0.0})
    out["overlap"] = est
    lines.append(f"disaggregated ({sampler_chips} sampling, {chips} training): synchronous "
                 f"{est['synchronous_s']:.3g} s a step, overlapped (rl.max_staleness >= 1) "
                 f"{est['overlapped_s']:.3g} s ({est['speedup']:.2f}x); the sampler waits "
                 f"{est['sampler_idle_s']:.3g} s, the trainer {est['trainer_idle_s']:.3g} s "
                 "(weight transfer and scoring not included)")
  return {"lines": lines, **out}


if __name__ == "__main__":
  errors.run(main)
