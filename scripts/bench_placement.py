"""Per-phase times of the synchronous RL step, and what overlapping sampler and trainer on
their own devices would make of them (`placement.overlap`; docs/placement.md).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_placement.py \
      --config=configs/paper_small.py --config.rl.placement=disaggregated --steps=6

Runs a short job (its SFT cut to --sft_steps) in a fresh temporary workdir, takes the median
of each phase over the RL steps after the first (which compiles), and prints them, the
estimate, and one JSON line. On a CPU host the two sides share the same cores, so wall time
cannot show the overlap itself: the estimate is what disjoint devices would give.
"""
import json
import statistics
import tempfile

from absl import flags

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax.rl import loop
from minirl_jax.rl import placement
from minirl_jax.rl import settings as settings_lib

_CONFIG = config_base.define_config_flag(__file__, default="paper_small")
_STEPS = flags.DEFINE_integer("steps", 6, "RL steps (the first is not timed).")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 2, "SFT steps before RL (the weights do not "
                                  "matter to the timing, only the lengths they sample).")

PHASES = placement.SAMPLER_PHASES + placement.TRAINER_PHASES


def main(argv):
  del argv
  metrics.quiet_library_logs()
  config = _CONFIG.value
  with config.unlocked():
    config.rl.steps, config.sft.max_steps = _STEPS.value, _SFT_STEPS.value
    config.rl.eval_every, config.log.plots, config.log.progress = 10 ** 6, False, False
  s = settings_lib.from_config(config)
  with tempfile.TemporaryDirectory() as workdir:
    run = loop.Run(s, workdir)
    run.run()
    with open(run.writer.path) as f:
      records = [json.loads(line) for line in f]
  timed = [r for r in records if r["stage"] == "rl" and r["step"] > 1]
  phases = {p: statistics.median(r[f"time/{p}_s"] for r in timed) for p in PHASES}
  estimate = placement.overlap(phases)
  tokens = statistics.median(r["rollout/tokens"] for r in timed)
  for name, value in {**phases, **estimate}.items():
    print(f"{name:>16}: {value:.3f}")
  print(json.dumps({"placement": s.rl.placement, "max_staleness": s.rl.max_staleness,
                    "timed_steps": len(timed), "rollout_tokens": tokens,
                    "phases_s": phases, **estimate}))


if __name__ == "__main__":
  errors.run(main)
