"""Prints completions the policy writes: a training run's latest checkpoint, converted
params, or a fresh model.

  python scripts/sample.py --workdir=runs/tiny --prompts=12+7=,45-19=
  python scripts/sample.py --config=configs/tiny.py          # random init from config.seed
Sampler knobs come from `config.sampler` (e.g. --config.sampler.temperature=0 for greedy);
use the --config the run was trained with. Params from --config.init_from are used too.
"""
import tempfile

from absl import app
from absl import flags
import jax
import numpy as np

from minirl_jax import config_base
from minirl_jax.rl import data as rl_data
from minirl_jax import metrics
from minirl_jax.rl import loop
from minirl_jax.sampling import sampler

_CONFIG = config_base.define_config_flag(__file__)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to read the latest "
                               "checkpoint from; unset: the initial params.")
_PROMPTS = flags.DEFINE_list("prompts", ["12+7=", "45-19=", "3+4="], "Prompt texts.")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 2, "Completions per prompt.")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  with tempfile.TemporaryDirectory() as scratch:
    _sample(_WORKDIR.value or scratch)


def _sample(workdir):
  run = loop.Run(_CONFIG.value, workdir)
  if _WORKDIR.value and not run.restore():
    raise SystemExit(f"no checkpoint under {run.ckpt.directory}")
  s, tok = run.s, run.data.tokenizer
  fmt = run.data.format_prompt or (lambda text: text)
  texts = [t for t in _PROMPTS.value for _ in range(_SAMPLES.value)]
  encoded = [tok.encode(fmt(t)) for t in texts]
  width = max(map(len, encoded))
  prompts = np.array([[tok.pad_id] * (width - len(e)) + e for e in encoded], np.int32)
  params = run.engines.quantize(run.state.params)
  rollout = sampler.generate(params, prompts, np.array([len(e) for e in encoded]),
                             jax.random.key(s.seed), model_cfg=s.model, sampler_cfg=s.sampler)
  run.close()
  print(f"sampler: {s.sampler}; progress: {run.progress_dict()}")
  for text, completion, n, mu in zip(texts, run.data.completions(rollout, s),
                                     rl_data.local_rows(rollout.num_generated),
                                     rl_data.local_rows(rollout.mu_logp).sum(axis=1)):
    print(f"{text!r:>14} -> {completion!r:<24} {n:>3} tokens, log mu = {mu:7.2f}")


if __name__ == "__main__":
  app.run(main)
