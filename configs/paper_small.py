"""Paper-small: the ablation grids' base (scripts/ablate.py): arithmetic chains, 8 experts top-2.

  python scripts/train.py --config=configs/paper_small.py --workdir=runs/paper_small
  python scripts/ablate.py --grid=onpolicy --seeds=3 --workdir=runs/onpolicy

Data: `data.task="chain"` (docs/data.md), 3-18 left-to-right +/- steps on operands below 10,
modulo 100, each step written out: "6-5-6+2=" -> "6-5=1 1-6=95 95+2=97 #97". Worked
solutions are 20-146 tokens (median 78 over 2,000 problems) and their length follows the
number of steps, so responses are long and vary in length (what token-level IS, length
normalisation and routing replay act on). Prompts are <= 38 tokens (max_prompt_len 40);
max_new_tokens 147 = the longest solution + EOS. Reward: `ChainTask.reward`, 1 only if every
step and the final `#answer` are right.

Model: ~977k parameters (313k active per token), 3 MoE layers of 8 experts, top-2.
RL: 8 prompts x 8 responses, one mini-batch of 64 (N = 1, on-policy); the off-policy grid
sets mini-batch 32 and raises prompts_per_step with N. Checkpoints every 10 steps, so an arm
cut off (a session's end, a preemption) resumes near where it stopped; resume is bit-exact.

Sampler: fp8 (the paper's FP8 inference against a float32 trainer; docs/sampling.md
"Which level the grids run at" says why the grids run there), 64 responses decoded over 16
slots (continuous batching).

Measured once on the 2-core CPU (timings with it idle; shared, it ran ~2x slower), to be
re-measured before sizing a grid. SFT: ~2.0 s per step; held-out accuracy (temperature 1) is
~0 until step 250, then 0.09 at 300, 0.23 at 375 and 0.33 at 475, where target_accuracy 0.3
stops it (~17 minutes with evaluations; the grids share one cold start per seed). RL, one grid
arm: ~5.4 s per step, ~30 s for the first (compiling), ~+10 s every
objective.grad_cosine_every steps, so 40 steps and 5 evaluations take ~5 minutes. From that
cold start, held-out accuracy went 0.37 -> 0.32 in 12 RL steps (within the +-0.04 noise of 128
problems) while reward/mean ranged 0.03-0.72 step to step (it follows the batch's chain
lengths); what 40 steps do has not been measured.
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(d_model=96, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24,
                      num_experts=8, top_k=2, expert_ffn_dim=128, dense_ffn_dim=384)
  config.data.update(task="chain", min_steps=3, max_steps=18, max_value=10, modulus=100,
                     operators="+-", max_prompt_len=40, eval_size=128)
  # max_new_tokens: the longest solution (146) + EOS. 16 slots for 64 responses: the
  # fastest rollouts measured (docs/sampling.md, "Continuous batching").
  config.sampler.update(dtype="fp8", max_new_tokens=147, prompt_bucket=8, slots=16)
  # N = 1 (on-policy): one mini-batch of 8 x 8; the off-policy grid raises prompts_per_step.
  config.rl.update(steps=40, prompts_per_step=8, group_size=8, mini_batch_size=64,
                   eval_every=10, learning_rate=2e-4)
  # Stops at target_accuracy (held-out, temperature 1), evaluated every 25 steps.
  config.sft.update(max_steps=1000, batch_size=64, eval_every=25, eval_size=128,
                    target_accuracy=0.3)
  config.checkpoint.update(every=10)
  return config
