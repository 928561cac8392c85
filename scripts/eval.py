"""Held-out accuracy (avg@k, pass@k) of a training run's latest checkpoint.

  python scripts/eval.py --workdir=runs/tiny --samples=8
Use the same --config (and overrides) the run was trained with. Last line: one JSON object.
"""
import json

from absl import app
from absl import flags

from minirl_jax import config_base
from minirl_jax import metrics
from minirl_jax.rl import loop

_CONFIG = config_base.define_config_flag(__file__)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_SAMPLES = flags.DEFINE_integer("samples", 8, "k: samples per problem.")
_SIZE = flags.DEFINE_integer("size", None, "Held-out problems (default: data.eval_size).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  run = loop.Run(_CONFIG.value, _WORKDIR.value)
  if not run.restore():
    raise SystemExit(f"no checkpoint under {run.ckpt.directory}")
  size = _SIZE.value or run.s.data.eval_size
  result = run.evaluate(samples=_SAMPLES.value, size=size, seed=_SEED.value)
  run.close()
  print(json.dumps({"workdir": _WORKDIR.value, "problems": size, **run.progress_dict(),
                    **result}))


if __name__ == "__main__":
  app.run(main)
