"""Lowers every program of a config for TPU and GPU on this machine, nothing allocated: the
check that a config compiles there, before a device is lent.

  python scripts/lower.py --config=configs/qwen3_30b_a3b_math.py:v5p
  python scripts/lower.py --config=configs/qwen3_30b_a3b_math.py:h100 --platforms=cuda

The mesh is the config's, on as many fake CPU devices as it needs (config.hardware.devices,
else the mesh's product, else --devices); the programs are `rl.programs` (SFT and RL
updates, pi_old, the sampler's prefill, start and decode loop), lowered with `jax.export`
for each platform. What lowering does not check: the device compiler itself (XLA's and
Mosaic's passes, memory; see scripts/plan.py). Prints one line per program and platform,
then one JSON line {"lowered": {program: {platform: "ok" or the error}}, "ok": bool};
exits 1 when any program fails to lower.
"""
import json
import math
import sys

from absl import flags
import jax

from minirl_jax import config_base
from minirl_jax import errors

_CONFIG = config_base.define_config_flag(__file__)
_PLATFORMS = flags.DEFINE_list("platforms", ["tpu", "cuda"], "Platforms to lower for.")
_DEVICES = flags.DEFINE_integer("devices", None, "Fake devices (default: "
                                "config.hardware.devices, else the mesh's product).")


def _devices(config) -> int:
  devices = _DEVICES.value or dict(config.get("hardware", {})).get("devices")
  if devices:
    return int(devices)
  sizes = dict(config.mesh)
  if any(v == -1 for v in sizes.values()):
    raise errors.UserError("the mesh has a -1 axis: pass --devices (or set "
                           "config.hardware.devices)")
  return math.prod(sizes.values())


def main(argv):
  del argv
  config = _CONFIG.value
  # Before any JAX backend starts: the mesh's devices, as fake CPU devices.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _devices(config))
  from minirl_jax.rl import programs  # after the device count is set
  from minirl_jax import sharding
  from minirl_jax.rl import settings
  s = settings.from_config(config)
  mesh = sharding.make_mesh(s.mesh)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} fake devices; "
        f"moe_impl={s.model.moe_impl}")
  report = {}
  for program, by_platform in programs.lower_all(s, mesh, tuple(_PLATFORMS.value)).items():
    report[program] = {p: "ok" if not text.startswith("error: ") else text[len("error: "):]
                       for p, text in by_platform.items()}
    for platform, result in report[program].items():
      print(f"{program:<10}{platform:<6}{result}")
  ok = all(r == "ok" for by_platform in report.values() for r in by_platform.values())
  print(json.dumps({"lowered": report, "ok": ok}))
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  errors.run(main)
