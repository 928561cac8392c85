"""Round 3, part 2: each objective's gradient estimator against the true policy gradient.

  python scripts/first_order.py --workdir=runs/round3 --chunks=64 --truth_chunks=256
  python scripts/first_order.py --workdir=runs/round3 --pilot --truth_chunks=64  # g* only
  python scripts/first_order.py --workdir=runs/round3 --report_only \
      --results=docs/results/round3

--workdir holds the checkpoints (coldstart/: round 2's cold start; minirl_seed0/: a
round-2-style MiniRL run, for rl50 and rl150) and writes <workdir>/first_order/<point>.npz
(the Gram matrix of the chunk vectors, `experiments.round3`) and .json (its statistics),
one point at a time: a finished point is never measured again, so the grid resumes where
it stopped. The grid is `round3.grid()` (docs/results/round3.md, part 1); --points keeps
the points whose name contains any of the given strings. The last line is one JSON object.
"""
import json
import os

from absl import flags

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax.experiments import round3
from minirl_jax.experiments import round3_report
from minirl_jax.rl import first_order

_CONFIG = config_base.define_config_flag(__file__, default="paper_moe")
_WORKDIR = flags.DEFINE_string("workdir", "runs/round3", "Checkpoints in, series out.")
_CHUNKS = flags.DEFINE_integer("chunks", 64, "Prompt chunks (global batches: "
                               "prompts_per_step x group_size responses) per estimator.")
_TRUTH_CHUNKS = flags.DEFINE_integer("truth_chunks", 256, "Prompt chunks of the true "
                                     "gradient (the estimators use the first --chunks).")
_POINTS = flags.DEFINE_list("points", [], "Only points whose name contains one of these.")
_PILOT = flags.DEFINE_bool("pilot", False, "Measure only the base point's true gradient and "
                           "print its noise ceiling as chunks accumulate (sizes --chunks).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only write the report of the finished points.")
_RESULTS = flags.DEFINE_string("results", None, "Where the report goes (tables, readings, "
                               "figures); default <workdir>/first_order/report.")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  out = os.path.join(_WORKDIR.value, "first_order")
  os.makedirs(out, exist_ok=True)
  points = [p for p in round3.grid()
            if not _POINTS.value or any(s in p.name for s in _POINTS.value)]
  if _PILOT.value:
    result = first_order.pilot(_CONFIG.value, _WORKDIR.value, _TRUTH_CHUNKS.value)
  else:
    if _CHUNKS.value > _TRUTH_CHUNKS.value:
      raise errors.UserError(f"--chunks ({_CHUNKS.value}) must be <= --truth_chunks "
                             f"({_TRUTH_CHUNKS.value}): the estimators use the true "
                             "gradient's first prompt chunks")
    result = {} if _REPORT_ONLY.value else first_order.run(
        _CONFIG.value, _WORKDIR.value, points, _CHUNKS.value, _TRUTH_CHUNKS.value, out)
    result.update(round3_report.write(out, _RESULTS.value or os.path.join(out, "report")))
  print(json.dumps(result))


if __name__ == "__main__":
  errors.run(main)
