"""The base experiment config: every key the code reads, with tiny-CPU defaults.

`configs/*.py` start from `get_base_config()` and override; `minirl_jax.rl.settings` turns
each section into the frozen dataclass the library takes, validating it before anything
compiles.
"""
import importlib.util
import os

import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags


def model_section() -> ml_collections.ConfigDict:
  """The tiny default model: ~226k parameters, 2 MoE layers of 4 experts, top-2."""
  return ml_collections.ConfigDict(dict(
      vocab_size=32, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      num_experts=4, top_k=2, expert_ffn_dim=128, dense_ffn_dim=256, moe_layers_skip=(),
      norm_topk_prob=True, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_embeddings=False,
      param_dtype="float32", compute_dtype="float32", load_balance_coef=0.0,
      router_z_coef=0.0, moe_impl="blocks", moe_block_size=128,
      # calls with at most this many assignments per expert (decode) run a dense pass over
      # the experts, reading each one's weights in place once (models/moe.py); 0: never
      moe_dense_max_group=16,
      # expert parallelism's all-to-all rows per device pair and round, over a balanced share
      expert_capacity_factor=1.25,
      init_std=config_dict.placeholder(float), remat=False,
      # queries whose attention scores exist at once (0: all); memory O(T * chunk)
      attention_chunk=512,
      # the trainer's log-probs take this many positions' logits at a time (and this many
      # vocabulary columns; 0: all): never the whole [B, T, V] (models/logprobs.py)
      logits_chunk=512, vocab_chunk=0))


# Qwen3-30B-A3B exactly (Hugging Face config.json of Qwen/Qwen3-30B-A3B-Base).
QWEN3_30B_A3B = dict(
    vocab_size=151_936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
    head_dim=128, num_experts=128, top_k=8, expert_ffn_dim=768, dense_ffn_dim=6144,
    moe_layers_skip=(), norm_topk_prob=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_embeddings=False, param_dtype="bfloat16", compute_dtype="bfloat16",
    load_balance_coef=0.001, router_z_coef=0.0, remat=True)


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Start from converted weights (scripts/convert_hf.py --out=DIR) instead of a random init.
  config.init_from = config_dict.placeholder(str)
  config.model = model_section()
  # Mesh axis sizes; -1 takes the remaining devices. Batches shard over data x fsdp x expert.
  config.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
  config.data = dict(
      path=config_dict.placeholder(str),  # JSONL/Parquet {prompt, answer[, solution]}; unset: synthetic
      eval_path=config_dict.placeholder(str),  # held-out set for a real data path
      # The synthetic task (docs/data.md): "arithmetic" (tasks.ArithmeticTask) reads
      # num_operands; "chain" (chain_task.ChainTask) reads min_steps, max_steps, modulus.
      task="arithmetic", num_operands=2, min_steps=2, max_steps=16, modulus=100,
      max_value=100, operators="+-",  # operands in [0, max_value); a subset of "+-*"
      max_prompt_len=8, eval_size=256,
      # held-out problems of the full evaluation at rl.full_eval_steps (0: none); the
      # eval_size problems of the frequent one are its first ones
      full_eval_size=0,
      tokenizer=config_dict.placeholder(str),  # tokenizer.json for real data; unset: characters
      # "package.module:function" computing R(prompt, completion, answer) in [0, 1];
      # unset: exact match (synthetic task) or math_reward (data.path).
      reward=config_dict.placeholder(str),
      reward_timeout_s=5.0,  # a reward call past this scores 0 (counted in reward/timeouts)
      # the run stops when more than this fraction of a step's reward calls fail (raise,
      # time out, or return anything but a number in [0, 1]) for 3 steps in a row
      reward_max_error_frac=0.5)
  config.sampler = dict(dtype="int8", temperature=1.0, top_p=1.0, top_k=0,
                        max_new_tokens=16, prompt_bucket=8,
                        activation_dtype=config_dict.placeholder(str),
                        kv_cache_dtype=config_dict.placeholder(str),  # None: activation dtype
                        quantize_embeddings=False, int4_group_size=32,
                        # rows decoded at once (0: all); an ended row takes the next
                        # waiting response (docs/sampling.md). Bounds the KV cache.
                        slots=0,
                        scan_layers=False)
  config.objective = dict(
      name="minirl", eps_low=0.2, eps_high=0.27, tis_cap=config_dict.placeholder(float),
      tis_target="pi_theta_mu", train_infer_is=config_dict.placeholder(bool),
      length_norm=config_dict.placeholder(bool), clip=True,
      normalize_std=config_dict.placeholder(bool), std_ddof=0, token_norm="batch",
      behaviour_logp="processed", grad_cosine_every=10,
      # "token" | "sequence" | "geometric"; is_bounds (lo, hi) rejects sequences
      # (docs/objectives.md, "Rollout corrections").
      is_level="token", is_bounds=config_dict.placeholder(tuple))
  config.objective.tis_cap = 5.0
  config.rl = dict(
      steps=150, prompts_per_step=64, group_size=8,
      mini_batch_size=512,  # sequences per optimizer update: N = 64 * 8 / 512 = 1
      routing_replay="none",  # "none" | "r2" | "r3"
      eval_every=25, learning_rate=2e-4, warmup_steps=0,
      full_eval_steps=(),  # RL steps (0: before the first) of the full evaluation
      allow_greedy=False,  # True: allow samplers whose G responses cannot differ
      # rows per forward/backward in an update, pi_old and the gradient cosine; 0: whole
      # mini-batch (global batch for pi_old). Activation memory follows it; values do not.
      micro_batch_size=0,
      # a warning names every this many RL steps in a row whose groups all had equal
      # rewards (zero advantages: nothing to learn; `reward/zero_adv_frac` = 1)
      no_signal_warn_steps=5)
  config.sft = dict(
      max_steps=2000, batch_size=64, learning_rate=3e-3, warmup_steps=50,
      eval_every=50, eval_size=128,  # a cheap held-out check that stops SFT early
      target_accuracy=0.3, micro_batch_size=0)
  config.optim = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                      # a run stops after this many steps in a row whose loss, gradients,
                      # update or new parameters were not all finite (each left the state as
                      # it was)
                      max_skipped_in_a_row=10)
  config.checkpoint = dict(every=50, keep=2)
  config.log = dict(progress=True, plots=True,
                    # Weights & Biases project for the same scalars, the config and the plots
                    # (pip install -e '.[wandb]'); unset: metrics.jsonl and TensorBoard only
                    wandb_project=config_dict.placeholder(str))
  return ml_collections.ConfigDict(config)


def define_config_flag(script_file: str, default: str = "tiny", name: str = "config"):
  """`--config=configs/NAME.py` (plus `--config.section.field=value` overrides) for a
  script in `scripts/`; the default is found next to the script, whatever the cwd."""
  path = os.path.join(os.path.dirname(os.path.abspath(script_file)), os.pardir, "configs",
                      f"{default}.py")
  return config_flags.DEFINE_config_file(
      name, os.path.normpath(path),
      f"Experiment config file; override fields with --{name}.section.field=value.",
      lock_config=True)


def sibling(config_file: str, name: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of configs/NAME.py next to `config_file`: a config that builds on
  another (configs are files, not a package, so they are loaded by path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)

