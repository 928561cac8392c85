"""Held-out accuracy (avg@k, pass@k) of a training run's latest checkpoint.

  python scripts/eval.py --workdir=runs/tiny --samples=8
Use the same --config (and overrides) the run was trained with. Last line: one JSON object.
"""
import dataclasses
import json

from absl import app
from absl import flags
import jax

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax import sharding
from minirl_jax.rl import checkpointing
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import rollout
from minirl_jax.rl import settings
from minirl_jax.rl import step

_CONFIG = config_base.define_config_flag(__file__)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_SAMPLES = flags.DEFINE_integer("samples", 8, "k: samples per problem.")
_SIZE = flags.DEFINE_integer("size", None, "Held-out problems (default: data.eval_size).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  s = settings.from_config(_CONFIG.value)
  mesh = sharding.make_mesh(s.mesh)
  data = rl_data.build(s)
  state, progress = checkpointing.read_latest(_WORKDIR.value, s, mesh)
  size = _SIZE.value or s.data.eval_size
  fns = step.bind(s, mesh, data.tokenizer, data.reward_fn)
  try:
    result = fns.evaluate(fns.quantize(state.params),
                          data.eval_batches(s, size, rollout.EVAL_BATCH),
                          jax.random.key(_SEED.value), samples=_SAMPLES.value)
  finally:
    fns.close()
  print(json.dumps({"workdir": _WORKDIR.value, "problems": size,
                    **dataclasses.asdict(progress), **result}))


if __name__ == "__main__":
  app.run(errors.reporting(main))
