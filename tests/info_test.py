"""Parameter counting from shapes."""
from minirl_jax.models import info
from minirl_jax.models.config import ModelConfig


def test_counts_match_hand_count():
  cfg = ModelConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=2, num_experts=4, top_k=1, expert_ffn_dim=3)
  counts = info.param_counts(cfg)
  assert counts["attn/wq"] == 16 and counts["attn/wk"] == 8 and counts["moe/w_down"] == 48
  # embed 40 + head 40 + norms 4+4+4+2+2 + attn 16+8+8+16 + router 16 + experts 3*48
  assert sum(counts.values()) == 304
  assert info.active_params(cfg, counts) == 304 - 144 + 36
