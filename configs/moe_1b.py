"""moe_1b: a ~1.0B-parameter Qwen3-MoE-style model (0.22B active: 4 of 32 experts per
token), bfloat16, for the device benchmark. 16 layers, d 1024, 16 query / 4 KV heads of 64,
32 experts of width 576, vocab 32768.

  python scripts/bench_device.py --config=configs/moe_1b.py     # on a lent accelerator
  python scripts/model_info.py --config=configs/moe_1b.py       # counts, nothing allocated

The benchmark's shapes: a policy update on 16 sequences of 512 + 1536 tokens, and decoding
64 responses (8 prompts x 8) of 1536 tokens with a bfloat16 sampler.
"""
from minirl_jax import config_base


def get_config():
  config = config_base.get_base_config()
  config.model.update(vocab_size=32_768, d_model=1024, num_layers=16, num_heads=16,
                      num_kv_heads=4, head_dim=64, num_experts=32, top_k=4,
                      expert_ffn_dim=576, param_dtype="bfloat16", compute_dtype="bfloat16",
                      moe_impl="ragged_dot", remat=True, attention_chunk=512,
                      logits_chunk=512, load_balance_coef=0.001)
  config.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  config.data.max_prompt_len = 512
  config.sampler.update(dtype="bfloat16", max_new_tokens=1536, prompt_bucket=128, slots=0)
  config.rl.update(prompts_per_step=8, group_size=8, mini_batch_size=16, micro_batch_size=0)
  config.sft.max_steps = 0
  return config
