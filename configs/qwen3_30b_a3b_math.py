"""The paper's setup: MiniRL on Qwen3-30B-A3B for math (Zheng et al. 2025, Sec. 5).

B=64 prompts x G=16 responses, mini-batch 1024 (N=1, on-policy; set rl.mini_batch_size to
512/256/128 for N=2/4/8), eps_low 0.2, eps_high 0.27, TIS cap 5, bf16 training, and an int8
(W8A8) sampler standing in for the paper's FP8 inference. Needs a TPU/GPU pod.

  python scripts/convert_hf.py --hf_dir=$CKPT/Qwen3-30B-A3B-coldstart --out=$CKPT/orbax
  python scripts/train.py --config=configs/qwen3_30b_a3b_math.py --workdir=$RUNS/minirl \\
    --config.init_from=$CKPT/orbax --config.data.tokenizer=$CKPT/Qwen3-30B-A3B-coldstart \\
    --config.data.path=$DATA/train.jsonl --config.data.eval_path=$DATA/aime.jsonl \\
    --config.mesh.fsdp=-1 --config.mesh.data=1 --config.mesh.expert=8
Data rows are JSONL/Parquet {"prompt", "answer"}; rewards use math_reward (\\boxed{} answer,
math-verify when installed: pip install -e ".[hf,math]"). The paper starts RL from a
cold-start checkpoint, so SFT is off here (sft.max_steps=0).
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(config_base.QWEN3_30B_A3B)
  config.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  config.data.update(max_prompt_len=1024, eval_size=30)
  config.sampler.update(dtype="int8", temperature=1.0, top_p=1.0, top_k=0,
                        max_new_tokens=32_768, prompt_bucket=128)
  config.objective.update(name="minirl", eps_low=0.2, eps_high=0.27, tis_cap=5.0,
                          tis_target="pi_theta_mu", clip=True, grad_cosine_every=0)
  config.rl.update(steps=1000, prompts_per_step=64, group_size=16, mini_batch_size=1024,
                   routing_replay="none", eval_every=20, learning_rate=1e-6, warmup_steps=0)
  config.sft.max_steps = 0
  config.optim.update(b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0)
  config.checkpoint.update(every=20, keep=3)
  return config
