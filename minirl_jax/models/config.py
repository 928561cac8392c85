"""`ModelConfig`: the frozen, self-validating description of a Qwen3-MoE-style model."""
import dataclasses
from typing import Optional

import jax.numpy as jnp

from minirl_jax import sections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Activations may also be float16: the sampler's float16 engine (docs/sampling.md).
COMPUTE_DTYPES = {**DTYPES, "float16": jnp.float16}


class MoeImpl(sections.Choice):
  """`model.moe_impl`: the experts' grouped-matmul kernel (`ModelConfig`)."""
  BLOCKS = "blocks"
  RAGGED_DOT = "ragged_dot"
  MEGABLOX = "megablox"


class ExpertExchange(sections.Choice):
  """`model.expert_exchange`: how expert parallelism moves rows (`ModelConfig`)."""
  RAGGED = "ragged"
  PADDED = "padded"


class AttentionImpl(sections.Choice):
  """`model.attention_impl`: how self-attention over whole sequences runs (`ModelConfig`)."""
  XLA = "xla"
  FLASH = "flash"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the decoder. Field names follow Hugging Face's Qwen3MoeConfig.

  Attributes:
    moe_layers_skip: indices of layers with a dense SwiGLU FFN instead of experts
      (Hugging Face's `mlp_only_layers`).
    norm_topk_prob: renormalise the top-k gate weights to sum to one.
    moe_impl: grouped-matmul kernel for the experts: "blocks" (block-padded groups,
      batched matmul; fast everywhere) or "ragged_dot" (`jax.lax.ragged_dot`, the TPU/GPU
      grouped-matmul kernel; on CPU it lowers to a dense masked matmul) or "megablox" (the
      Pallas TPU kernel, `models.megablox`; interpret mode on CPU, ragged_dot on GPU).
      Pick by measuring (scripts/bench_moe.py) or, for a TPU slice, by the compiled
      programs' estimate (scripts/compile.py: megablox on the 30B TPU presets).
    moe_block_size: upper bound on the rows per block of the "blocks" kernel, and the
      rows per tile of "megablox".
    moe_dense_max_group: a MoE call with at most this many token-expert assignments per
      expert on average (decode: a few tokens per step) runs every token through every
      expert instead of `moe_impl`, reading each expert's weights in place once; 0: never.
      It costs E / k times the grouped kernel's FLOPs, so it pays while weight traffic
      dominates: on XLA:CPU at configs/bench.py, float32 decode is 1.7x faster (with the
      sampler's per-layer weights) at batch 16 and 64, i.e. 4 and 16 per expert
      (`scripts/bench_sampler.py --batches=16,64`); larger groups keep the grouped kernel.
      W8A8 samplers never take it (`sampler.engine_config`).
    expert_capacity_factor: under expert parallelism (`models.expert_parallel`), the rows
      one all-to-all round moves per device pair, as a multiple of a balanced share. Never
      drops tokens (overflow runs another round); larger costs compute, smaller rounds.
    expert_exchange: "ragged" (`jax.lax.ragged_all_to_all` on TPU and GPU, only each
      pair's rows move; the padded exchange on CPU) or "padded" (`jax.lax.all_to_all` of
      the capacity-padded slots everywhere: for TPU slices whose interconnect XLA:TPU's
      ragged all-to-all does not support, v5e among them).
    remat: recompute each layer's activations in the backward pass (`jax.checkpoint`)
      instead of storing them: memory for compute, what large models train with.
    attention_impl: "xla" (`layers.attend`: matmuls XLA compiles, a query chunk's scores in
      memory at a time) or "flash" (`models.flash`: on TPU, the Pallas flash attention
      kernel for self-attention over whole sequences, scores kept on chip, causal blocks
      skipped; `layers.attend` elsewhere and in the sampler's cached attention).
    attention_chunk: queries whose attention scores are held at once (`layers.attend`),
      each chunk recomputed in the backward pass; 0: all queries. With "flash", the
      kernel's query and key blocks (rounded up to 128).
    logits_chunk: positions whose logits the trainer holds at once when it takes token
      log-probs and entropies (`models.logprobs`); 0: all positions.
    vocab_chunk: vocabulary columns per step of those log-probs' online log-sum-exp; 0:
      the whole vocabulary at once.
  """
  vocab_size: int = 32
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  num_experts: int = 4
  top_k: int = 2
  expert_ffn_dim: int = 128
  dense_ffn_dim: int = 256
  moe_layers_skip: tuple[int, ...] = ()
  norm_topk_prob: bool = True
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  load_balance_coef: float = 0.0
  router_z_coef: float = 0.0
  moe_impl: MoeImpl = MoeImpl.BLOCKS
  moe_block_size: int = 128
  moe_dense_max_group: int = 16
  expert_capacity_factor: float = 1.25
  expert_exchange: ExpertExchange = ExpertExchange.RAGGED
  init_std: Optional[float] = None  # None: 1/sqrt(fan_in)
  remat: bool = False
  attention_impl: AttentionImpl = AttentionImpl.XLA
  attention_chunk: int = 512
  logits_chunk: int = 512
  vocab_chunk: int = 0

  def __post_init__(self):
    object.__setattr__(self, "moe_layers_skip", tuple(int(i) for i in self.moe_layers_skip))
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "num_experts", "top_k", "expert_ffn_dim", "dense_ffn_dim",
                  "moe_block_size"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        sections.fail(f"model.{field}", f"must be a positive integer, got {value!r}")
    for field in ("attention_chunk", "logits_chunk", "vocab_chunk", "moe_dense_max_group"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 0:
        sections.fail(f"model.{field}", f"must be an integer >= 0 (0: off), got {value!r}")
    if self.num_heads % self.num_kv_heads:
      sections.fail("model.num_heads", f"({self.num_heads}) must be divisible by num_kv_heads "
                    f"({self.num_kv_heads})")
    if self.head_dim % 2:
      sections.fail("model.head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
    if self.top_k > self.num_experts:
      sections.fail("model.top_k", f"({self.top_k}) must be <= num_experts ({self.num_experts})")
    if self.num_experts > 32_767:
      sections.fail("model.num_experts", f"must fit int16 routing ids, got {self.num_experts}")
    bad = [i for i in self.moe_layers_skip if not 0 <= i < self.num_layers]
    if bad:
      sections.fail("model.moe_layers_skip", f"has indices outside [0, {self.num_layers}): {bad}")
    for field, known in (("param_dtype", DTYPES), ("compute_dtype", COMPUTE_DTYPES)):
      if getattr(self, field) not in known:
        sections.fail(f"model.{field}",
                      f"must be one of {sorted(known)}, got {getattr(self, field)!r}")
    sections.set_choice(self, "moe_impl", MoeImpl, "model.moe_impl")
    sections.set_choice(self, "attention_impl", AttentionImpl, "model.attention_impl")
    sections.set_choice(self, "expert_exchange", ExpertExchange, "model.expert_exchange")
    for field in ("rope_theta", "rms_norm_eps", "expert_capacity_factor"):
      if getattr(self, field) <= 0:
        sections.fail(f"model.{field}", f"must be > 0, got {getattr(self, field)}")
    for field in ("load_balance_coef", "router_z_coef"):
      if getattr(self, field) < 0:
        sections.fail(f"model.{field}", f"must be >= 0, got {getattr(self, field)}")

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if i not in self.moe_layers_skip)

  @property
  def dense_layer_ids(self) -> tuple[int, ...]:
    return tuple(sorted(self.moe_layers_skip))

  @property
  def num_moe_layers(self) -> int:
    return len(self.moe_layer_ids)

  @property
  def routing_dtype(self):
    """Compact integer dtype for expert ids (and -1 for "route live")."""
    return jnp.int8 if self.num_experts <= 127 else jnp.int16

  @property
  def dtype(self):
    return COMPUTE_DTYPES[self.compute_dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def segments(self) -> list[tuple[str, int, int]]:
    """Runs of consecutive same-kind layers: (kind, first layer, end layer)."""
    runs = []
    for i in range(self.num_layers):
      kind = "dense" if i in self.moe_layers_skip else "moe"
      if runs and runs[-1][0] == kind:
        runs[-1] = (kind, runs[-1][1], i + 1)
      else:
        runs.append((kind, i, i + 1))
    return runs


def from_dict(section) -> ModelConfig:
  """Builds a ModelConfig from a mapping (e.g. `config.model`), naming unknown keys."""
  return sections.build(ModelConfig, section, "model")
