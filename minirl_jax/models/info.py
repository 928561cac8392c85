"""Parameter counts by component, from shapes only (`jax.eval_shape`: nothing allocated)."""
import flax
import jax
import numpy as np

from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameters per component ("attn/wq", "moe/w_up", ...), counted without memory."""
  shapes = jax.eval_shape(lambda key: transformer.init_params(cfg, key), jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(shapes, sep="/")
  return {name: int(np.prod(x.shape)) for name, x in sorted(flat.items())}


def active_params(cfg: ModelConfig, counts: dict[str, int]) -> int:
  """Parameters one token touches: all but the unchosen experts (embeddings included,
  as in Qwen's "3.3B activated")."""
  expert_frac = cfg.top_k / cfg.num_experts
  return int(sum(n * expert_frac if name in ("moe/w_gate", "moe/w_up", "moe/w_down") else n
                 for name, n in counts.items()))
