"""The train-infer gap of each sampler format on a training run's latest checkpoint.

  python scripts/gap.py --workdir=runs/tiny [--levels=float32,bfloat16,float16,int8,fp8,int4]
Use the same --config (and overrides) the run was trained with; sampler overrides such as
--config.sampler.kv_cache_dtype=int8 apply to every level. Samples the same held-out
prompts with each level's sampler, recomputes pi_old with the trainer and prints a table
(the `zero` row is the zero-gap control, mu := pi_old), then one JSON line.
"""
import dataclasses
import itertools
import json

from absl import flags
import jax

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax.rl import checkpointing
from minirl_jax.rl import gap
from minirl_jax.rl import gap_levels

_CONFIG = config_base.define_config_flag(__file__)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_LEVELS = flags.DEFINE_list("levels", list(gap_levels.LEVELS),
                            "Sampler dtypes, optionally dtype:activation_dtype.")
_BATCHES = flags.DEFINE_integer("batches", 2, "K: held-out prompt batches per level.")
_PROMPTS = flags.DEFINE_integer("prompts", None, "Prompts per batch (default: "
                                "rl.prompts_per_step).")
_SAMPLES = flags.DEFINE_integer("samples", None, "Responses per prompt (default: "
                                "rl.group_size).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  for level in _LEVELS.value:
    if level != gap_levels.ZERO:
      gap.parse_level(level)  # fail before restoring anything
  run = checkpointing.load_run(_CONFIG.value, _WORKDIR.value)
  s, mesh, state, data, progress = run.s, run.mesh, run.state, run.data, run.progress
  prompts = _PROMPTS.value or s.rl.prompts_per_step
  samples = _SAMPLES.value or s.rl.group_size
  batches = list(itertools.islice(
      data.eval_batches(s, _BATCHES.value * prompts, prompts), _BATCHES.value))
  results = gap.measure(state.params, batches, jax.random.key(_SEED.value),
                        levels=_LEVELS.value, s=s, mesh=mesh, samples=samples)
  print(f"workdir {_WORKDIR.value} (sft step {progress.sft_step}, rl step "
        f"{progress.rl_step}); trainer {s.model.compute_dtype}, routing replay "
        f"{s.rl.routing_replay}, tis_cap {s.objective.tis_cap}; {len(batches)} batches x "
        f"{prompts} prompts x {samples} samples")
  print(gap.table(results))
  print(json.dumps({"workdir": _WORKDIR.value, **dataclasses.asdict(progress),
                    "batches": len(batches), "prompts": prompts, "samples": samples,
                    "levels": results}))


if __name__ == "__main__":
  errors.run(main)
