"""Sampler params: dtype casts, int8 weight records, W8A8 contractions."""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax.models import linear
from minirl_jax.models import transformer
from minirl_jax.models import weights
from minirl_jax.models.config import ModelConfig
from minirl_jax.sampling import quantize

CFG = ModelConfig()  # tiny: 2 MoE layers
MIXED = ModelConfig(num_layers=3, moe_layers_skip=(1,))  # MoE and dense layers
AXES = transformer.param_axes(CFG)


@pytest.fixture(scope="module")
def params():
  # An "rbg" key compiles the initialisers ~3x faster than threefry on CPU.
  return transformer.init_params(CFG, jax.random.key(0, impl="rbg"))


@pytest.fixture(scope="module")
def int8_params(params):
  return quantize.quantize(params, "int8", AXES)


def _abstract(cfg, dtype):
  """Shapes and dtypes of quantised params, computed without allocating or compiling."""
  return jax.eval_shape(lambda k: quantize.quantize(
      transformer.init_params(cfg, k), dtype, transformer.param_axes(cfg)), jax.random.key(0))


def test_int8_records_and_float_leaves():
  flat = lambda tree: flax.traverse_util.flatten_dict(tree)
  shapes = flat(jax.eval_shape(lambda k: transformer.init_params(MIXED, k), jax.random.key(0)))
  axes = flat(transformer.param_axes(MIXED))
  out = flat(_abstract(MIXED, "int8"))
  assert out.keys() == shapes.keys()
  assert {path for path, leaf in out.items() if linear.is_quantized(leaf)} == {
      ("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"), ("moe", "w_gate"),
      ("moe", "w_up"), ("moe", "w_down"), ("mlp", "w_gate"), ("mlp", "w_up"), ("mlp", "w_down")}
  for path, leaf in out.items():
    if linear.is_quantized(leaf):
      assert leaf.values.dtype == jnp.int8 and leaf.scale.dtype == jnp.float32
      w, contracted = shapes[path], weights.contracted_axes(axes[path])
      assert leaf.values.shape == w.shape
      assert leaf.scale.shape == tuple(1 if i in contracted else n
                                       for i, n in enumerate(w.shape))
    elif path == ("moe", "router"):
      assert leaf.dtype == jnp.float32
    else:  # embedding, lm_head, norms
      assert leaf.dtype == jnp.bfloat16, path


def test_int8_bytes_are_about_half_of_bfloat16():
  for cfg in (CFG, MIXED):
    ratio = (quantize.weight_bytes(_abstract(cfg, "int8"))
             / quantize.weight_bytes(_abstract(cfg, "bfloat16")))
    print(f"int8 / bf16 weight bytes = {ratio:.3f}")
    assert 0.5 < ratio <= 0.55  # int8 values + float32 scales, 16-bit embedding and head


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_modes_cast_and_keep_the_router_float32(params, dtype):
  out = quantize.quantize(params, dtype, AXES)
  assert out["moe"]["router"].dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(out["attn"])} == {jnp.dtype(dtype)}
  np.testing.assert_allclose(out["moe"]["w_up"].astype(jnp.float32), params["moe"]["w_up"],
                             rtol=1e-2 if dtype == "bfloat16" else 0)


def test_dequantized_weights_within_half_a_step(params, int8_params):
  flat = flax.traverse_util.flatten_dict(int8_params)
  for path, axes in flax.traverse_util.flatten_dict(AXES).items():
    if weights.kind(axes) != "matrix":
      continue
    q, w = flat[path], params[path[0]][path[1]]
    err = jnp.abs(q.dequantize() - w)
    assert bool(jnp.all(err <= 0.5 * q.scale * (1 + 1e-5))), path
    # Every output channel uses the full int8 range.
    np.testing.assert_array_equal(
        jnp.max(jnp.abs(q.values), axis=weights.contracted_axes(axes)), 127)


@jax.jit
def _w8a8_vs_float(x, w):
  """Relative error of each model contraction in W8A8, and the bf16-activation dtype."""
  out = {}
  for eqn, x_eqn, axes in [
      ("btd,dhk->bthk", "btd", (0,)),        # q/k/v projections
      ("bthk,hkd->btd", "bthk", (0, 1)),     # output projection
      ("btd,df->btf", "btd", (0,)),          # dense FFN
      ("nbd,ndf->nbf", "nbd", (1,))]:        # expert blocks
    xs = x.reshape(2, 5, 4, 16) if x_eqn == "bthk" else x
    ws = w[eqn]
    exact = jnp.einsum(eqn, xs, ws)
    approx = linear.einsum(eqn, xs, linear.quantize_weight(ws, axes))
    out[eqn] = jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact)
  return out


def test_w8a8_einsum_close_to_float():
  keys = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(keys[0], (2, 5, 64))
  w = {"btd,dhk->bthk": jax.random.normal(keys[1], (64, 4, 16)) / 8,
       "bthk,hkd->btd": jax.random.normal(keys[2], (4, 16, 64)) / 8,
       "btd,df->btf": jax.random.normal(keys[3], (64, 128)) / 8,
       "nbd,ndf->nbf": jax.random.normal(keys[4], (2, 64, 128)) / 8}
  for eqn, rel in _w8a8_vs_float(x, w).items():
    assert 0 < float(rel) < 1e-2, (eqn, float(rel))
  q = linear.quantize_weight(w["btd,df->btf"], (0,))
  assert linear.einsum("btd,df->btf", x.astype(jnp.bfloat16), q).dtype == jnp.bfloat16


def test_float_einsum_and_take_unchanged():
  x, w = jnp.ones((2, 3, 4)), jax.random.normal(jax.random.key(0), (4, 5))
  np.testing.assert_array_equal(linear.einsum("btd,df->btf", x, w),
                                jnp.einsum("btd,df->btf", x, w))
  idx = jnp.array([1, 1])
  np.testing.assert_array_equal(linear.take(w, idx), w[idx])
  q = linear.quantize_weight(w, (0,))
  np.testing.assert_array_equal(linear.take(q, idx).dequantize(), q.dequantize()[idx])


@jax.jit
def _ragged(x, w, sizes):
  return (linear.ragged_dot(x, w, sizes), jax.lax.ragged_dot(x, w, sizes),
          linear.ragged_dot(x, linear.quantize_weight(w, (1,)), sizes))


def test_w8a8_ragged_dot_close_to_float():
  kx, kw = jax.random.split(jax.random.key(2))
  x, w = jax.random.normal(kx, (10, 16)), jax.random.normal(kw, (3, 16, 8))
  exact, reference, approx = _ragged(x, w, jnp.array([4, 0, 6], jnp.int32))
  np.testing.assert_array_equal(exact, reference)
  assert float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact)) < 1e-2


def test_int8_forward_through_the_same_model(params, int8_params):
  tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, CFG.vocab_size)
  fwd = jax.jit(transformer.forward, static_argnames="cfg")
  ref, ref_aux = fwd(params, tokens, cfg=CFG)
  # Replaying the float32 routing isolates the matmul error from (legitimate) expert flips.
  out, aux = fwd(int8_params, tokens, cfg=dataclasses.replace(CFG, compute_dtype="bfloat16"),
                 routing=ref_aux.routing)
  assert out.dtype == jnp.float32 and aux.routing.dtype == jnp.int8
  # Loose: bf16 activations + int8 weights; the KL test in sampling_test is the real measure.
  assert float(jnp.max(jnp.abs(out - ref))) < 0.25
  assert float(jnp.mean(jnp.abs(out - ref))) < 0.05


def test_unknown_dtype_is_named(params):
  with pytest.raises(ValueError, match=r"sampler\.dtype"):
    quantize.quantize(params, "fp8", AXES)


def test_leaves_the_axes_do_not_describe_are_named(params):
  extra = {**params, "attn": {**params["attn"], "bias": jnp.zeros(3)}}
  with pytest.raises(ValueError, match="attn/bias"):
    quantize.quantize(extra, "int8", AXES)
  missing = {k: v for k, v in params.items() if k != "lm_head"}
  with pytest.raises(ValueError, match="lm_head"):
    quantize.quantize(missing, "bfloat16", AXES)
  unknown = transformer.param_axes(CFG)
  unknown["attn"]["wq"] = ("layers", "embed", "heads", "rotary")
  with pytest.raises(ValueError, match="attn/wq.*'rotary'"):
    quantize.quantize(params, "int8", unknown)


def test_int8_forward_is_the_same_with_either_moe_kernel():
  cfg = ModelConfig()
  params = quantize.quantize(transformer.init_params(cfg, jax.random.key(0)), "int8", AXES)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
  run = lambda cfg: jax.jit(lambda p, t: transformer.forward(p, t, cfg=cfg)[0])(params, tokens)
  blocks = run(cfg)
  ragged = run(dataclasses.replace(cfg, moe_impl="ragged_dot"))
  np.testing.assert_allclose(ragged, blocks, rtol=1e-5, atol=1e-5)
