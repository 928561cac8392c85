"""Prints completions the policy writes: a training run's latest checkpoint, converted
params, or a fresh model.

  python scripts/sample.py --workdir=runs/tiny --prompts=12+7=,45-19=
  python scripts/sample.py --config=configs/tiny.py          # random init from config.seed
Sampler knobs come from `config.sampler` (e.g. --config.sampler.temperature=0 for greedy);
use the --config the run was trained with. Params from --config.init_from are used too.
"""
from absl import flags
import jax
import numpy as np

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import metrics
from minirl_jax.data import pipeline
from minirl_jax.models import transformer
from minirl_jax.rl import checkpointing
from minirl_jax.rl import rollout
from minirl_jax.sampling import quantize

_CONFIG = config_base.define_config_flag(__file__)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to read the latest "
                               "checkpoint from; unset: the initial params.")
_PROMPTS = flags.DEFINE_list("prompts", ["12+7=", "45-19=", "3+4="], "Prompt texts.")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 2, "Completions per prompt.")


def main(argv):
  del argv
  metrics.quiet_library_logs()
  run = checkpointing.load_run(_CONFIG.value, _WORKDIR.value)
  s, mesh, state, data = run.s, run.mesh, run.state, run.data
  progress = run.progress or "initial params"
  tok, fmt = data.tokenizer, data.format_prompt or (lambda text: text)
  texts = [t for t in _PROMPTS.value for _ in range(_SAMPLES.value)]
  encoded = [tok.encode(fmt(t)) for t in texts]
  width = max(map(len, encoded))
  tokens, masks = zip(*(pipeline.left_pad(e, width, tok.pad_id) for e in encoded))
  prompts = {"prompt_tokens": np.stack(tokens), "prompt_mask": np.stack(masks)}
  sampler_params = quantize.for_sampler(state.params, s.sampler,
                                        transformer.param_axes(s.model))
  out = rollout.sample(sampler_params, prompts, jax.random.key(s.seed), group_size=1,
                       model_cfg=s.model, sampler_cfg=s.sampler, mesh=mesh)
  print(f"sampler: {s.sampler}; progress: {progress}")
  for text, completion, n, mu in zip(
      texts, rollout.completions(out, tok, s.sampler.eos_ids),
      rollout.local_rows(out.num_generated), rollout.local_rows(out.mu_logp).sum(axis=1)):
    print(f"{text!r:>14} -> {completion!r:<24} {n:>3} tokens, log mu = {mu:7.2f}")


if __name__ == "__main__":
  errors.run(main)
