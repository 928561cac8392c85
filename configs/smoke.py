"""Smoke: the whole pipeline (SFT, RL, eval, checkpoints, plots) in well under a minute.

  python scripts/train.py --config=configs/smoke.py --workdir=runs/smoke
Numbers mean nothing at this size; it exists for tests and for checking an install.
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(d_model=32, num_heads=2, num_kv_heads=1, expert_ffn_dim=32)
  config.data.eval_size = 16
  config.sampler.max_new_tokens = 10
  config.data.max_value = 20  # short problems: solutions fit 10 new tokens
  config.rl.update(steps=3, prompts_per_step=4, group_size=4, mini_batch_size=8, eval_every=3)
  config.sft.update(max_steps=4, batch_size=8, eval_every=2, eval_size=16, warmup_steps=1,
                    target_accuracy=1.1)
  config.checkpoint.every = 2
  config.objective.grad_cosine_every = 2
  config.log.update(progress=False, plots=True)
  return config
