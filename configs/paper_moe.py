"""Paper-MoE: round 2's base (docs/results/round2.md), a model whose routing matters.

  python scripts/ablate.py --grid=round2 --seeds=10 --workdir=runs/round2
  python scripts/train.py --config=configs/paper_moe.py --workdir=runs/paper_moe

The grids' chain task (configs/paper_small.py) on a model in the paper's regime: 4 MoE layers
of 32 experts, top-4, each expert 64 wide (the active FFN per token equals paper_small's 8
experts top-2 of 128), a bfloat16 trainer as in the paper, the fp8 sampler (16 slots), and a
cold start stopped at 20% held-out accuracy (paper_small: 30%).

Measured on the 2-core CPU before the grid (round2.md, "The base config"): at the cold start
(SFT step 325, 0.344 held-out at RL step 0) the fp8 sampler and the trainer route 4.5%,
6.8%, 11.3% and 13.4% of (token, layer) top-k sets differently (9.0% over all; float32 sampler
1.4%), k3 KL 1.6e-3 per token, entropy 0.044 nats per token at RL step 1; an RL step takes
~3.1 s (sampling 1.2 s, update 1.5 s), SFT ~1.6 s a step.

Round 2 evaluates 128 held-out problems every 5 RL steps (the collapse criterion and the early
warning read them) and all 1024 at `rl.full_eval_steps` (the verdicts read the mean of steps
190 and 200), for 200 RL steps.
"""
from minirl_jax import config_base


def get_config():
  config = config_base.sibling(__file__, "paper_small")
  config.model.update(num_layers=4, num_experts=32, top_k=4, expert_ffn_dim=64,
                      compute_dtype="bfloat16")
  config.data.update(eval_size=128, full_eval_size=1024)
  config.rl.update(steps=200, eval_every=5, full_eval_steps=(0, 100, 150, 180, 190, 200))
  config.sft.update(target_accuracy=0.2)
  return config
