"""The paper's setup: MiniRL on Qwen3-30B-A3B for math (Zheng et al. 2025, Sec. 5).

B=64 prompts x G=16 responses, mini-batch 1024 (N=1, on-policy; set rl.mini_batch_size to
512/256/128 for N=2/4/8), eps_low 0.2, eps_high 0.27, TIS cap 5, bf16 training, and an int8
(W8A8) sampler standing in for the paper's FP8 inference. Needs a TPU/GPU pod; the presets
`:v5p` (TPU v5p-256), `:v5e` (v5e-256), `:v6e` (v6e-256) and `:h100` (8 x H100 80GB) set a
mesh, micro-batches, chunks and kernels that fit (XLA:TPU's own memory for the TPU slices,
`scripts/compile.py`; the memory plan for the GPU host):

  python scripts/plan.py --config=configs/qwen3_30b_a3b_math.py:v5p

  python scripts/convert_hf.py --hf_dir=$CKPT/Qwen3-30B-A3B-coldstart --out=$CKPT/orbax
  python scripts/train.py --config=configs/qwen3_30b_a3b_math.py:v5p --workdir=$RUNS/minirl \\
    --config.init_from=$CKPT/orbax --config.data.tokenizer=$CKPT/Qwen3-30B-A3B-coldstart \\
    --config.data.path=$DATA/train.jsonl --config.data.eval_path=$DATA/aime.jsonl
Data rows are JSONL/Parquet {"prompt", "answer"}; rewards use math_reward (\\boxed{} answer,
math-verify when installed: pip install -e ".[hf,math]"). The paper starts RL from a
cold-start checkpoint, so SFT is off here (sft.max_steps=0).
"""
from minirl_jax import config_base


# Mesh, micro-batches and chunks that fit by XLA:TPU (`scripts/compile.py`; the memory plan,
# `scripts/plan.py`, for the GPU host), with the kernels chosen by the compiled programs'
# estimates (docs/scaling.md): on TPU the Pallas grouped matmul (megablox, 512-row tiles) and
# flash attention (512-token blocks); on GPU ragged_dot and XLA's attention.
_TPU_KERNELS = dict(moe_impl="megablox", moe_block_size=512, attention_impl="flash",
                    attention_chunk=512)
PRESETS = {
    # A TPU v5p-256 slice: 128 chips of 95 GiB.
    "v5p": dict(hardware=dict(name="TPU v5p-256", devices=128, device_gib=95.0,
                              topology="v5p:4x4x8"),
                mesh=dict(data=1, fsdp=16, expert=8, tensor=1),
                rl=dict(micro_batch_size=128), sampler=dict(slots=1024),
                model=_TPU_KERNELS),
    # A TPU v5e-256 slice: 256 chips of 16 GiB. One sequence per chip per micro-batch still
    # holds too much at the paper's budget; XLA:TPU fits responses of up to 8,192 tokens.
    # Its interconnect has no ragged all-to-all (XLA:TPU refuses it): padded expert slots.
    "v5e": dict(hardware=dict(name="TPU v5e-256", devices=256, device_gib=16.0,
                              topology="v5e:16x16"),
                mesh=dict(data=1, fsdp=16, expert=16, tensor=1),
                rl=dict(micro_batch_size=256), sampler=dict(slots=1024, max_new_tokens=8192),
                model=dict(_TPU_KERNELS, expert_exchange="padded")),
    # A TPU v6e-256 slice: 256 chips of 32 GiB; responses of up to 16,384 tokens.
    "v6e": dict(hardware=dict(name="TPU v6e-256", devices=256, device_gib=32.0,
                              topology="v6e:16x16"),
                mesh=dict(data=1, fsdp=16, expert=16, tensor=1),
                rl=dict(micro_batch_size=256), sampler=dict(slots=1024, max_new_tokens=16384),
                model=_TPU_KERNELS),
    # One host of 8 x H100 80 GB, plain FSDP. The train state (bf16 weights, Adam moments
    # and gradient buffers) takes ~50 GiB of each GPU, so the paper's 32k-token responses
    # do not fit (train step 74.9 of 72 usable GiB by the plan); this preset samples up to
    # 8k tokens.
    "h100": dict(hardware=dict(name="8 x H100 80GB", devices=8, device_gib=80.0),
                 mesh=dict(data=1, fsdp=8, expert=1, tensor=1),
                 rl=dict(micro_batch_size=8),
                 sampler=dict(slots=128, max_new_tokens=8192),
                 model=dict(moe_impl="ragged_dot", attention_chunk=128)),
}


def get_config(preset: str = ""):
  config = config_base.get_base_config()
  config.model.update(config_base.QWEN3_30B_A3B)
  config.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  config.data.update(max_prompt_len=1024, eval_size=30)
  config.sampler.update(dtype="int8", activation_dtype="bfloat16", temperature=1.0,
                        top_p=1.0, top_k=0,
                        max_new_tokens=32_768, prompt_bucket=128)
  config.objective.update(name="minirl", eps_low=0.2, eps_high=0.27, tis_cap=5.0,
                          tis_target="pi_theta_mu", clip=True, grad_cosine_every=0)
  config.rl.update(steps=1000, prompts_per_step=64, group_size=16, mini_batch_size=1024,
                   routing_replay="none", eval_every=20, learning_rate=1e-6, warmup_steps=0)
  config.sft.max_steps = 0
  config.optim.update(b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0)
  config.checkpoint.update(every=20, keep=3)
  if preset:
    if preset not in PRESETS:
      raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    config.hardware = dict(PRESETS[preset]["hardware"])
    for section in ("mesh", "rl", "sampler", "model"):
      config[section].update(PRESETS[preset][section])
  return config
