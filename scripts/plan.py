"""Per-device memory of a config on a mesh, from shapes alone (nothing is allocated).

  python scripts/plan.py --config=configs/qwen3_30b_a3b_math.py:v5p
  python scripts/plan.py --config=configs/qwen3_30b_a3b_math.py:h100 --config.rl.micro_batch_size=16

Prints each part (params, optimizer state, gradients, activations with remat on and off,
the logits chunk, sampler weights, KV cache) and each program's peak with what stays
resident, then one JSON line: {"per_device_bytes": {...}, "device_bytes": ..., "fits": ...}.
The device count and memory come from the config's `hardware` section (presets set it) or
--devices / --device_gib; a `hardware.topology` (a TPU slice) plans for XLA:TPU, whose decode
loop also holds the sampler's weights gathered over fsdp (`plan.make`). The model of
activations is checked against XLA's own memory analysis in tests/plan_test.py
(minirl_jax/plan.py says how) and against XLA:TPU by scripts/compile.py.
"""
import json
import math

from absl import flags

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import plan as plan_lib
from minirl_jax.rl import settings

_CONFIG = config_base.define_config_flag(__file__)
_DEVICES = flags.DEFINE_integer("devices", None, "Devices (default: config.hardware.devices, "
                                "else the mesh's product when it has no -1).")
_DEVICE_GIB = flags.DEFINE_float("device_gib", None, "Memory per device in GiB (default: "
                                 "config.hardware.device_gib).")
_RESERVE = flags.DEFINE_float("reserve", 0.1, "Fraction of device memory kept free for the "
                              "runtime and fragmentation.")


def _hardware(config):
  hardware = dict(config.get("hardware", {}))
  devices = _DEVICES.value or hardware.get("devices")
  if not devices:
    sizes = dict(config.mesh)
    if any(v == -1 for v in sizes.values()):
      raise errors.UserError("the mesh has a -1 axis: pass --devices (or set "
                             "config.hardware.devices)")
    devices = math.prod(sizes.values())
  device_gib = _DEVICE_GIB.value or hardware.get("device_gib")
  if not device_gib:
    raise errors.UserError("pass --device_gib (or set config.hardware.device_gib)")
  return int(devices), float(device_gib), hardware.get("name", f"{devices} devices")


def main(argv):
  del argv
  config = _CONFIG.value
  devices, device_gib, name = _hardware(config)
  s = settings.from_config(config)
  # A TPU preset names its slice; XLA:TPU keeps more in the decode loop (plan.make).
  platform = "tpu" if dict(config.get("hardware", {})).get("topology") else ""
  plan = plan_lib.make(s, devices, platform)
  budget = device_gib * plan_lib.GIB * (1 - _RESERVE.value)
  gib = lambda b: f"{b / plan_lib.GIB:9.2f}"
  print(f"{name}: {devices} devices x {device_gib:g} GiB; mesh {plan.mesh}; "
        f"T = {s.data.max_prompt_len} + {s.sampler.max_new_tokens} tokens")
  print(f"{'part (per device)':<28}{'GiB':>9}")
  for part, size in plan.parts.items():
    print(f"{part:<28}{gib(size)}")
  print(f"{'program peak (resident +)':<28}{'GiB':>9}")
  for program, size in plan.peaks.items():
    print(f"{program:<28}{gib(size)}")
  fits = plan.device_bytes <= budget
  print(f"largest peak {gib(plan.device_bytes).strip()} GiB of {budget / plan_lib.GIB:.2f} GiB "
        f"usable ({1 - _RESERVE.value:.0%} of {device_gib:g}): "
        f"{'fits' if fits else 'does NOT fit'}")
  peaks = {f"peak_{k}": v for k, v in plan.peaks.items()}
  print(json.dumps({"per_device_bytes": {**plan.parts, **peaks},
                    "device_bytes": int(device_gib * plan_lib.GIB), "fits": fits,
                    "mesh": plan.mesh}))


if __name__ == "__main__":
  errors.run(main)
