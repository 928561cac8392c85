"""Per-weight facts from logical axes: kind, contracted axes, fan-in, weight-decay mask."""
import flax
import jax
import pytest

from minirl_jax.models import transformer
from minirl_jax.models import weights
from minirl_jax.models.config import ModelConfig

# MoE and dense layers, untied head; every dim distinct so a wrong axis shows in fan_in.
CFG = ModelConfig(vocab_size=32, d_model=48, num_layers=3, moe_layers_skip=(1,),
                  num_heads=4, num_kv_heads=2, head_dim=10, num_experts=4,
                  expert_ffn_dim=24, dense_ffn_dim=40, tie_embeddings=False)
NORMS = {("attn", "norm"), ("attn", "q_norm"), ("attn", "k_norm"), ("moe", "norm"),
         ("mlp", "norm"), ("final_norm",)}


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


AXES = _flat(transformer.param_axes(CFG))
SHAPES = {path: x.shape for path, x in _flat(jax.eval_shape(
    lambda k: transformer.init_params(CFG, k), jax.random.key(0))).items()}


def test_contracted_axes_of_every_leaf():
  expected = {  # the int8 table these facts replaced (axis 0 stacks layers) ...
      ("attn", "wq"): (1,), ("attn", "wk"): (1,), ("attn", "wv"): (1,),
      ("attn", "wo"): (1, 2),
      ("moe", "w_gate"): (2,), ("moe", "w_up"): (2,), ("moe", "w_down"): (2,),
      ("mlp", "w_gate"): (1,), ("mlp", "w_up"): (1,), ("mlp", "w_down"): (1,),
      # ... plus the weights it kept in float.
      ("moe", "router"): (1,), ("lm_head",): (0,), ("embed",): (),
      **{path: () for path in NORMS}}
  assert {path: weights.contracted_axes(a) for path, a in AXES.items()} == expected


def test_kinds():
  kinds = {path: weights.kind(a) for path, a in AXES.items()}
  assert {p for p, k in kinds.items() if k == "norm"} == NORMS
  assert {p for p, k in kinds.items() if k == "router"} == {("moe", "router")}
  assert {p for p, k in kinds.items() if k == "embedding"} == {("embed",), ("lm_head",)}
  assert len([k for k in kinds.values() if k == "matrix"]) == 10


def test_fan_in_by_hand():
  fan_in = {path: weights.fan_in(SHAPES[path], a) for path, a in AXES.items()}
  d, h, hd, f, fd = 48, 4, 10, 24, 40
  assert fan_in[("attn", "wq")] == d
  assert fan_in[("attn", "wo")] == h * hd
  assert fan_in[("moe", "w_down")] == f
  assert fan_in[("mlp", "w_down")] == fd
  assert fan_in[("moe", "router")] == d
  assert fan_in[("lm_head",)] == d
  assert fan_in[("embed",)] == 1  # a gather: N(0, 1) init


def test_decay_mask_is_exactly_the_matrices():
  mask = weights.decay_mask(transformer.param_axes(CFG))
  assert jax.tree.structure(mask) == jax.tree.structure(
      jax.eval_shape(lambda k: transformer.init_params(CFG, k), jax.random.key(0)))
  flat = _flat(mask)
  assert {path for path, decay in flat.items() if not decay} == NORMS
  assert all(isinstance(decay, bool) for decay in flat.values())


def test_axes_that_fit_no_rule_are_named():
  with pytest.raises(ValueError, match="'rotary'"):
    weights.kind(("layers", "embed", "rotary"))
  with pytest.raises(ValueError, match="'rotary'"):
    weights.contracted_axes(("layers", "rotary", "embed"))
  with pytest.raises(ValueError, match="no 'embed' axis"):
    weights.contracted_axes(("layers", "mlp"))
  with pytest.raises(ValueError, match="fit no rule"):
    weights.kind(())
  with pytest.raises(ValueError, match="rank"):
    weights.fan_in((4, 5), ("layers", "embed", "mlp"))
