"""`SamplerConfig`: the frozen, self-validating knobs of the inference engine."""
import dataclasses
from typing import Optional

from minirl_jax import sections
from minirl_jax.sampling import quantize

ACTIVATION_DTYPES = (None, "float32", "bfloat16", "float16")
# None = the activation dtype; "fp8" (float8_e4m3fn) and "int8" store one float32 scale per
# (token, kv head) beside the values.
KV_CACHE_DTYPES = (None, "float32", "bfloat16", "float16", "fp8", "int8")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How the inference engine samples.

  Attributes:
    dtype: "float32", "bfloat16", "float16", "int8" (W8A8), "fp8" (W8A8 e4m3) or "int4"
      (W4, weight-only, grouped scales). The params passed to `generate` must come from
      `quantize.for_sampler(params, sampler_cfg, axes)` (docs/sampling.md has the table).
    activation_dtype: dtype of the residual stream and attention; None = the dtype itself
      for "bfloat16" and "float16", else float32 (int8 and fp8 matmuls quantise their
      inputs per token either way). "bfloat16" with a quantised dtype is the usual
      accelerator setup; on CPU, XLA emulates bfloat16 arithmetic and it halves int8
      decode speed (docs/sampling.md).
    kv_cache_dtype: storage of the KV cache: None (the activation dtype), "float32",
      "bfloat16", "float16" (casts), "fp8" or "int8" (per token and kv head scales);
      reading it dequantises to the activation dtype.
    quantize_embeddings: quantised dtypes only: the embedding table and lm_head carry the
      format's weight error too (by default they stay bfloat16).
    int4_group_size: entries of the contracted axis that share one int4 scale (the whole
      axis where it is shorter).
    temperature: logits are divided by it before sampling; 0 samples greedily (argmax).
    top_p: nucleus sampling mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    max_new_tokens: completion length budget.
    eos_ids: ids that end a completion (may be empty: always generate max_new_tokens).
    pad_id: written after a row's EOS.
    prompt_bucket: prompts are left-padded to a multiple of this, so many prompt lengths
      share one compiled program.
    slots: rows (responses, over all devices) decoded at once, so the KV cache has this
      many rows. A slot whose response has ended takes the next waiting one (continuous
      batching), so a step's responses never wait for the longest of a fixed batch. 0: as
      many slots as the step has responses (every response starts at once; none waits).
    scan_layers: `quantize.for_sampler` keeps the weights stacked and decode scans them,
      as the trainer does: a smaller program (compile time of very deep models). False
      (default): per-layer weights and cache (`transformer.unstack_layers`), run as an
      unrolled loop that reads them in place; a scan inside the decode loop copies each
      layer's weights out of the stack every step. `generate` runs whichever form it gets.
    logit_noise: standard deviation of Gaussian noise added to every logit before anything
      else (a dial for the train-inference gap beyond what a number format gives; round 3's
      widest level). mu is the noisy distribution the token came from. 0: none.
  """
  dtype: quantize.SamplerDtype = quantize.SamplerDtype.FLOAT32
  activation_dtype: Optional[str] = None
  kv_cache_dtype: Optional[str] = None
  quantize_embeddings: bool = False
  int4_group_size: int = quantize.DEFAULT_GROUP_SIZE
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 32
  eos_ids: tuple[int, ...] = (1,)
  pad_id: int = 0
  prompt_bucket: int = 16
  slots: int = 0
  scan_layers: bool = False
  logit_noise: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    sections.set_choice(self, "dtype", quantize.SamplerDtype, "sampler.dtype")
    if self.activation_dtype not in ACTIVATION_DTYPES:
      sections.fail("sampler.activation_dtype", f"must be one of {ACTIVATION_DTYPES}, got "
                    f"{self.activation_dtype!r}")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      sections.fail("sampler.kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}, got "
                    f"{self.kv_cache_dtype!r}")
    for field in ("quantize_embeddings", "scan_layers"):
      if not isinstance(getattr(self, field), bool):
        sections.fail(f"sampler.{field}", f"must be a bool, got {getattr(self, field)!r}")
    if not self.temperature >= 0:
      sections.fail("sampler.temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
    if not self.logit_noise >= 0:
      sections.fail("sampler.logit_noise", f"must be >= 0, got {self.logit_noise}")
    if not 0 < self.top_p <= 1:
      sections.fail("sampler.top_p", f"must be in (0, 1], got {self.top_p}")
    for field, low in (("top_k", 0), ("max_new_tokens", 1), ("pad_id", 0),
                       ("prompt_bucket", 1), ("int4_group_size", 1), ("slots", 0)):
      value = getattr(self, field)
      if not isinstance(value, int) or value < low:
        sections.fail(f"sampler.{field}", f"must be an integer >= {low}, got {value!r}")
    if any(i < 0 for i in self.eos_ids):
      sections.fail("sampler.eos_ids", f"must be non-negative token ids, got {self.eos_ids}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def compute_dtype(self) -> str:
    if self.activation_dtype:
      return self.activation_dtype
    return self.dtype.value if self.dtype in ("bfloat16", "float16") else "float32"
