"""The main job: cold-start SFT, then synchronous MiniRL, with metrics, plots, checkpoints.

  python scripts/train.py --workdir=runs/tiny                 # the embedded tiny default
  python scripts/train.py --config=configs/small.py --workdir=runs/small --config.rl.steps=50
Re-running with the same --workdir resumes from its latest checkpoint.
"""
import json

from absl import flags
import jax

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax import plan
from minirl_jax.rl import loop
from minirl_jax.rl import settings

_CONFIG = config_base.define_config_flag(__file__)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-node GPU; "
    "start the same command on every host).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (metrics, plots, "
                               "checkpoints); an existing one is resumed.", required=True)


def main(argv):
  del argv
  metrics.quiet_library_logs()
  s = settings.from_config(_CONFIG.value)
  if _MULTIHOST.value:
    jax.distributed.initialize()
  plan.check_fits(s, jax.device_count(), *plan.device_memory_bytes())
  summary = loop.Run(s, _WORKDIR.value).run()
  print("plots:", *summary.pop("plots", []), sep="\n  ")
  print(json.dumps(summary))


if __name__ == "__main__":
  errors.run(main)
