"""The decoder: shapes, causality, padding, routing replay, KV cache, full-size shapes."""
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=29, num_layers=3, moe_layers_skip=(1,), num_experts=4, top_k=2)
B, T = 3, 9


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def fwd():
  return jax.jit(lambda p, tok, mask=None, routing=None: transformer.forward(
      p, tok, cfg=CFG, attn_mask_BT=mask, routing=routing))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)


def test_shapes_and_dtypes(params, fwd, tokens):
  logits, aux = fwd(params, tokens)
  chex.assert_shape(logits, (B, T, CFG.vocab_size))
  assert logits.dtype == jnp.float32
  chex.assert_shape(aux.routing, (2, B, T, 2))  # two MoE layers, dense layer 1 has none
  assert aux.routing.dtype == jnp.int8
  chex.assert_shape(aux.router_probs, (2, B, T, 4))
  chex.assert_shape(aux.expert_load, (2, 4))
  np.testing.assert_allclose(jnp.sum(aux.expert_load, -1), 1.0, rtol=1e-6)
  chex.assert_tree_all_finite((logits, aux.load_balance_loss, aux.router_z_loss))
  chex.assert_shape(params["mlp"]["w_gate"], (1, 64, 256))
  chex.assert_shape(params["moe"]["w_gate"], (2, 4, 64, 128))
  axes = transformer.param_axes(CFG)
  is_axes = lambda x: isinstance(x, tuple)
  for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
    assert p.ndim == len(a)


def test_bfloat16_params_and_compute():
  cfg = ModelConfig(param_dtype="bfloat16", compute_dtype="bfloat16")
  p = transformer.init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
  tok = jnp.zeros((1, 4), jnp.int32)
  logits, aux = jax.jit(lambda p, t: transformer.forward(p, t, cfg=cfg))(p, tok)
  assert logits.dtype == jnp.float32 and aux.router_probs.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def test_causal(params, fwd, tokens):
  logits, aux = fwd(params, tokens)
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % CFG.vocab_size)
  logits2, aux2 = fwd(params, changed)
  np.testing.assert_array_equal(logits[:, :6], logits2[:, :6])
  np.testing.assert_array_equal(aux.routing[:, :, :6], aux2.routing[:, :, :6])
  assert float(jnp.max(jnp.abs(logits[:, 6:] - logits2[:, 6:]))) > 1e-4


def test_left_padding_gives_unpadded_logits(params, fwd, tokens):
  pad = 4
  padded = jnp.concatenate([jnp.full((B, pad), 7), tokens], axis=1)
  mask = jnp.arange(T + pad)[None, :] >= pad
  mask = jnp.broadcast_to(mask, (B, T + pad))
  logits_pad, aux_pad = fwd(params, padded, mask)
  logits, aux = fwd(params, tokens)
  np.testing.assert_allclose(logits_pad[:, pad:], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(aux_pad.routing[:, :, pad:], aux.routing)


def test_replaying_own_routing_is_identical_and_minus_one_is_live(params, fwd, tokens):
  logits, aux = fwd(params, tokens)
  logits_r, aux_r = fwd(params, tokens, None, aux.routing)
  np.testing.assert_array_equal(logits, logits_r)
  live = jnp.full_like(aux.routing, -1)
  logits_l, _ = fwd(params, tokens, None, live)
  np.testing.assert_array_equal(logits, logits_l)
  # Only the second MoE layer's token 4 of row 0 replays other experts.
  other = (aux.routing.astype(jnp.int32) + 1) % CFG.num_experts
  partial = live.at[1, 0, 4].set(other[1, 0, 4].astype(live.dtype))
  logits_p, aux_p = fwd(params, tokens, None, partial)
  np.testing.assert_array_equal(aux_p.routing[1, 0, 4], other[1, 0, 4])
  np.testing.assert_array_equal(logits_p[:, :4], logits[:, :4])
  np.testing.assert_array_equal(logits_p[1:], logits[1:])
  assert float(jnp.max(jnp.abs(logits_p[0, 4] - logits[0, 4]))) > 1e-4


def test_live_routing_is_the_routers_choice_under_replay(params, fwd, tokens):
  _, free = fwd(params, tokens)
  np.testing.assert_array_equal(free.live_routing, free.routing)
  other = ((free.routing.astype(jnp.int32) + 1) % CFG.num_experts).astype(free.routing.dtype)
  # Replaying other experts in the last MoE layer only leaves every router's input unchanged.
  replay = jnp.full_like(other, -1).at[-1].set(other[-1])
  _, aux = fwd(params, tokens, None, replay)
  assert aux.live_routing.dtype == free.routing.dtype
  np.testing.assert_array_equal(aux.routing, jnp.stack([free.routing[0], other[-1]]))
  np.testing.assert_array_equal(aux.live_routing, free.routing)
  # Replaying every layer changes the later routers' inputs; the first sees the same.
  _, aux = fwd(params, tokens, None, other)
  np.testing.assert_array_equal(aux.routing, other)
  np.testing.assert_array_equal(aux.live_routing[0], free.routing[0])


def test_router_gradient_under_replay(params, fwd, tokens):
  _, aux = fwd(params, tokens)
  replay = (aux.routing.astype(jnp.int32) + 1) % CFG.num_experts

  def loss(p):
    logits, _ = transformer.forward(p, tokens, cfg=CFG, routing=replay)
    return jnp.mean(transformer.token_logp(logits, tokens))

  g = jax.jit(jax.grad(loss))(params)
  assert float(jnp.min(jnp.linalg.norm(g["moe"]["router"].reshape(2, -1), axis=-1))) > 1e-6


def test_remat_gives_the_same_gradients(params, tokens):
  import dataclasses
  def grads(cfg):
    loss = lambda p: jnp.mean(transformer.token_logp(
        transformer.forward(p, tokens, cfg=cfg)[0], tokens))
    return jax.jit(jax.grad(loss))(params)
  remat_cfg = dataclasses.replace(CFG, remat=True)
  chex.assert_trees_all_close(grads(remat_cfg), grads(CFG), rtol=1e-5, atol=1e-6)
  jaxpr = lambda cfg: str(jax.make_jaxpr(lambda p: transformer.forward(p, tokens, cfg=cfg))(
      params))
  assert "remat" in jaxpr(remat_cfg) and "remat" not in jaxpr(CFG)


def test_attention_chunks_give_the_same_values_and_gradients(params, fwd, tokens):
  """Chunked queries (with padding of the last chunk and a cache path) equal one pass."""
  import dataclasses
  mask = jnp.broadcast_to(jnp.arange(T)[None] >= jnp.array([[0], [2], [4]]), (B, T))

  def value_and_grads(chunk):
    cfg = dataclasses.replace(CFG, attention_chunk=chunk)
    loss = lambda p: jnp.mean(jnp.sin(transformer.forward(p, tokens, cfg=cfg,
                                                          attn_mask_BT=mask)[0]))
    return jax.jit(jax.value_and_grad(loss))(params)

  want = value_and_grads(0)
  chex.assert_trees_all_close(value_and_grads(4), want, rtol=1e-6, atol=1e-7)  # 9 = 4+4+1
  cfg = dataclasses.replace(CFG, attention_chunk=4)
  cached = jax.jit(lambda p: transformer.forward(
      p, tokens, cfg=cfg, attn_mask_BT=mask,
      kv_cache=transformer.init_kv_cache(cfg, B, T + 3))[0])(params)
  full = fwd(params, tokens, mask)[0]
  np.testing.assert_allclose(np.asarray(cached)[np.asarray(mask)],
                             np.asarray(full)[np.asarray(mask)], rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda p: transformer.forward(p, tokens, cfg=cfg))(params))
  assert "remat" in jaxpr  # each chunk's scores are recomputed, not stored, for backward


def test_token_logp_alignment():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
  logp = transformer.token_logp(logits, jnp.array([[1, 0, 1]]))
  np.testing.assert_allclose(logp, np.log([[1.0, 0.5, 0.75]]), rtol=1e-6)


def test_kv_cache_chunks_equal_full_forward(params, fwd, tokens):
  pad = 2
  padded = jnp.concatenate([jnp.zeros((B, pad), jnp.int32), tokens], axis=1)
  mask = jnp.broadcast_to(jnp.arange(T + pad)[None] >= pad, (B, T + pad))
  mask = mask.at[0, :pad + 1].set(False)  # rows may carry different amounts of padding
  logits, aux = fwd(params, padded, mask)
  cache = transformer.init_kv_cache(CFG, B, T + pad + 3)
  step = jax.jit(lambda p, tok, m, c: transformer.forward(p, tok, cfg=CFG, attn_mask_BT=m,
                                                          kv_cache=c))
  outs, routes = [], []
  for lo, hi in [(0, 6), (6, 7), (7, 8), (8, T + pad)]:
    out, aux_c = step(params, padded[:, lo:hi], mask[:, lo:hi], cache)
    cache = aux_c.kv_cache
    outs.append(out)
    routes.append(aux_c.routing)
  valid = np.asarray(mask)
  np.testing.assert_allclose(np.concatenate(outs, 1)[valid], np.asarray(logits)[valid],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      np.concatenate(routes, 2).transpose(1, 2, 0, 3)[valid],
      np.asarray(aux.routing).transpose(1, 2, 0, 3)[valid])
  assert int(cache.end) == T + pad


def test_dense_model_has_empty_routing():
  cfg = ModelConfig(num_layers=2, moe_layers_skip=(0, 1))
  p = transformer.init_params(cfg, jax.random.key(0))
  assert "moe" not in p
  logits, aux = jax.jit(lambda p: transformer.forward(p, jnp.zeros((2, 3), jnp.int32),
                                                      cfg=cfg))(p)
  chex.assert_shape(aux.routing, (0, 2, 3, cfg.top_k))
  chex.assert_shape(aux.live_routing, (0, 2, 3, cfg.top_k))
  assert aux.live_routing.dtype == cfg.routing_dtype
  chex.assert_tree_all_finite(logits)


def _load_config(name):
  path = pathlib.Path(__file__).parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_qwen3_30b_a3b_shapes_without_memory():
  from minirl_jax.models import config as model_config
  cfg = model_config.from_dict(_load_config("qwen3_30b_a3b").model)
  shapes = jax.eval_shape(lambda k: transformer.init_params(cfg, k), jax.random.key(0))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 30.3e9 < total < 30.7e9  # Qwen3-30B-A3B: 30.5B parameters
  chex.assert_shape(shapes["moe"]["w_gate"], (48, 128, 2048, 768))
  chex.assert_shape(shapes["attn"]["wk"], (48, 2048, 4, 128))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  logits, aux = jax.eval_shape(lambda p, t: transformer.forward(p, t, cfg=cfg), shapes, tokens)
  chex.assert_shape(logits, (1, 8, 151_936))
  chex.assert_shape(aux.routing, (48, 1, 8, 8))
  assert aux.routing.dtype == jnp.int16


def test_per_layer_params_and_cache_equal_the_stacked_ones(params, tokens):
  """`unstack_layers` (the sampler's decode form: an unrolled loop over per-layer weights
  and cache) computes what the scanned stack does, replay and a quantised cache included."""
  layered = transformer.unstack_layers(params)
  assert len(layered["attn"]) == 3 and len(layered["moe"]) == 2 and len(layered["mlp"]) == 1
  np.testing.assert_array_equal(layered["moe"][1]["w_up"], params["moe"]["w_up"][1])
  replay = jnp.full((2, B, T, 2), -1, jnp.int8).at[1, :, ::2].set(jnp.array([3, 0], jnp.int8))

  @jax.jit
  def run(p, cache):
    logits, aux = transformer.forward(p, tokens, cfg=CFG, routing=replay, kv_cache=cache)
    return logits, aux.routing, aux.kv_cache

  cache = transformer.init_kv_cache(CFG, B, T + 2, "int8")
  want_logits, want_routing, want_cache = run(params, cache)
  logits, routing, layered_cache = run(layered, transformer.unstack_layers(cache))
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(routing, want_routing)
  assert isinstance(layered_cache.k_LBSGK, tuple) and len(layered_cache.k_LBSGK) == 3
  chex.assert_trees_all_equal(layered_cache, transformer.unstack_layers(want_cache))
