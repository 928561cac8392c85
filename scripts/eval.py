"""Held-out accuracy (avg@k, pass@k) of a training run's latest checkpoint.

  python scripts/eval.py --workdir=runs/tiny --samples=8
Use the same --config (and overrides) the run was trained with. Last line: one JSON object.
"""
import dataclasses
import json

from absl import flags
import jax

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax.rl import checkpointing
from minirl_jax.rl import rollout
from minirl_jax.rl import wiring

_CONFIG = config_base.define_config_flag(__file__)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_SAMPLES = flags.DEFINE_integer("samples", 8, "k: samples per problem.")
_SIZE = flags.DEFINE_integer("size", None, "Held-out problems (default: data.eval_size).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  run = checkpointing.load_run(_CONFIG.value, _WORKDIR.value)
  s = run.s
  size = _SIZE.value or s.data.eval_size
  fns = wiring.bind(s, run.mesh, run.data.tokenizer, run.data.reward_fn)
  try:
    result = fns.evaluate(fns.quantize(run.state.params),
                          run.data.eval_batches(s, size, rollout.EVAL_BATCH),
                          jax.random.key(_SEED.value), samples=_SAMPLES.value)
  finally:
    fns.close()
  print(json.dumps({"workdir": _WORKDIR.value, "problems": size,
                    **dataclasses.asdict(run.progress), **result}))


if __name__ == "__main__":
  errors.run(main)
