"""Sampler params: dtype casts, int8 / fp8 / int4 weight records, their contractions."""
import dataclasses
import functools

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


@functools.partial(jax.jit, static_argnames="fmt")
def _quantized_vs_float(x, w, fmt="int8"):
  """Relative error of each model contraction with `fmt` weights (int4: groups of 32)."""
  out = {}
  for eqn, x_eqn, axes in [
      ("btd,dhk->bthk", "btd", (0,)),        # q/k/v projections
      ("bthk,hkd->btd", "bthk", (0, 1)),     # output projection
      ("btd,df->btf", "btd", (0,)),          # dense FFN
      ("nbd,ndf->nbf", "nbd", (1,))]:        # expert blocks
    xs = x.reshape(2, 5, 4, 16) if x_eqn == "bthk" else x
    ws = w[eqn]
    exact = jnp.einsum(eqn, xs, ws)
    approx = linear.einsum(eqn, xs, linear.quantize_weight(
        ws, axes, fmt, quantize.DEFAULT_GROUP_SIZE if fmt in quantize.GROUPED else None))
    out[eqn] = jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact)
  return out


def _einsum_operands():
  keys = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(keys[0], (2, 5, 64))
  w = {"btd,dhk->bthk": jax.random.normal(keys[1], (64, 4, 16)) / 8,
       "bthk,hkd->btd": jax.random.normal(keys[2], (4, 16, 64)) / 8,
       "btd,df->btf": jax.random.normal(keys[3], (64, 128)) / 8,
       "nbd,ndf->nbf": jax.random.normal(keys[4], (2, 64, 128)) / 8}
  return x, w


def test_w8a8_einsum_close_to_float():
  x, w = _einsum_operands()
  for eqn, rel in _quantized_vs_float(x, w).items():
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
    quantize.quantize(params, "fp4", AXES)


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


# fp8 (W8A8 e4m3, per channel) and int4 (weight-only, grouped) --------------------------

# e4m3 has 3 mantissa bits: rounding to nearest is within 2^-4 of a normal value, and
# within half the subnormal spacing 2^-9 of a tiny one (in units of the scale).
E4M3_REL, E4M3_ABS = 2.0 ** -4, 2.0 ** -10
# Relative (Frobenius) error bounds of one contraction against float32 on the operands of
# `_einsum_operands`, from the per-element errors: int8 half a step of absmax/127 on
# weights and activations, fp8 up to 2^-4 relative on both, int4 half a step of absmax/7
# on weights (~0.3 sigma for 32 Gaussian entries). Measured: 0.9%, 3.6%, 10%.
EINSUM_BOUND = {"int8": 1e-2, "fp8": 5e-2, "int4": 0.15}


@pytest.fixture(scope="module")
def quantized(params):
  return {fmt: quantize.quantize(params, fmt, AXES) for fmt in ("int8", "fp8", "int4")}


def _entry_scale(q):
  """The scale that covers each entry of a record (grouped scales repeated)."""
  return linear.QuantizedWeight(values=jnp.ones(q.values.shape, jnp.int8),
                                scale=q.scale).dequantize()


@pytest.mark.parametrize("fmt,storage", [("fp8", jnp.float8_e4m3fn), ("int4", jnp.int4)])
def test_fp8_and_int4_records(fmt, storage):
  flat = flax.traverse_util.flatten_dict
  shapes = flat(jax.eval_shape(lambda k: transformer.init_params(MIXED, k), jax.random.key(0)))
  axes = flat(transformer.param_axes(MIXED))
  out = flat(_abstract(MIXED, fmt))
  quantized = {path for path, leaf in out.items() if linear.is_quantized(leaf)}
  assert quantized == {path for path in axes if weights.kind(axes[path]) == "matrix"}
  for path in quantized:
    leaf, shape, contracted = out[path], shapes[path].shape, weights.contracted_axes(axes[path])
    assert leaf.values.dtype == storage and leaf.scale.dtype == jnp.float32
    assert leaf.values.shape == shape
    want = [1 if i in contracted else n for i, n in enumerate(shape)]
    if fmt == "int4":  # groups of 32 along the innermost contracted axis (or all of it)
      want[contracted[-1]] = shape[contracted[-1]] // min(32, shape[contracted[-1]])
    assert leaf.scale.shape == tuple(want), path
  assert out[("moe", "router")].dtype == jnp.float32
  assert out[("embed",)].dtype == out[("lm_head",)].dtype == jnp.bfloat16


def test_int4_groups_by_hand():
  # One output channel, 8 inputs in groups of 4: absmax 1.4 -> scale 0.2, absmax 7 -> 1.
  w = jnp.array([0.6, -1.4, 0.4, 0.0, 7.0, 1.0, -2.0, 3.0])[:, None]
  q = linear.quantize_weight(w, (0,), "int4", group_size=4)
  np.testing.assert_allclose(q.scale, [[0.2], [1.0]], rtol=1e-6)
  np.testing.assert_array_equal(q.values.astype(jnp.int8)[:, 0], [3, -7, 2, 0, 7, 1, -2, 3])
  np.testing.assert_allclose(q.dequantize(), w, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="group size 3 does not divide"):
    linear.quantize_weight(w, (0,), "int4", group_size=3)


def test_fp8_dequantized_weights_within_the_e4m3_grid(params, quantized):
  flat = flax.traverse_util.flatten_dict(quantized["fp8"])
  for path, axes in flax.traverse_util.flatten_dict(AXES).items():
    if weights.kind(axes) != "matrix":
      continue
    q, w = flat[path], params[path[0]][path[1]]
    err = jnp.abs(q.dequantize() - w)
    bound = jnp.maximum(E4M3_REL * jnp.abs(w), E4M3_ABS * q.scale) * (1 + 1e-5)
    assert bool(jnp.all(err <= bound)), path
    # Every output channel's absmax lands on the largest finite e4m3 value.
    np.testing.assert_array_equal(jnp.max(jnp.abs(q.values.astype(jnp.float32)),
                                          axis=weights.contracted_axes(axes)), 448.0)


def test_int4_dequantized_weights_within_half_a_group_step(params, quantized):
  flat = flax.traverse_util.flatten_dict(quantized["int4"])
  for path, axes in flax.traverse_util.flatten_dict(AXES).items():
    if weights.kind(axes) != "matrix":
      continue
    q, w = flat[path], params[path[0]][path[1]]
    err = jnp.abs(q.dequantize() - w)
    assert bool(jnp.all(err <= 0.5 * _entry_scale(q) * (1 + 1e-5))), path
    # Every group's absmax lands on 7, the edge of the symmetric grid [-7, 7].
    contracted = weights.contracted_axes(axes)
    axis, shape = contracted[-1], q.values.shape
    groups = q.scale.shape[axis]
    values = jnp.abs(q.values.astype(jnp.int8)).reshape(
        shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1:])
    np.testing.assert_array_equal(jnp.max(values, axis=contracted[:-1] + (axis + 1,)), 7)


def test_quantized_einsum_close_to_float_and_ordered():
  x, w = _einsum_operands()
  rel = {fmt: {k: float(v) for k, v in _quantized_vs_float(x, w, fmt).items()}
         for fmt in EINSUM_BOUND}
  print({fmt: {k: f"{v:.2e}" for k, v in r.items()} for fmt, r in rel.items()})
  for fmt, by_eqn in rel.items():
    for eqn, r in by_eqn.items():
      assert 0 < r < EINSUM_BOUND[fmt], (fmt, eqn, r)
      if fmt != "int8":
        assert r > rel["int8"][eqn], (fmt, eqn)
    assert fmt != "int4" or all(by_eqn[e] > rel["fp8"][e] for e in by_eqn)
  q = linear.quantize_weight(w["btd,df->btf"], (0,), "fp8")
  assert linear.einsum("btd,df->btf", x.astype(jnp.bfloat16), q).dtype == jnp.bfloat16


@functools.partial(jax.jit, static_argnames="fmt")
def _ragged_format(x, w, sizes, fmt):
  q = linear.quantize_weight(w, (1,), fmt, 8 if fmt in quantize.GROUPED else None)
  return linear.ragged_dot(x, q, sizes), jnp.einsum("nd,ndf->nf", x, w[_expert_of_row(sizes)])


def _expert_of_row(sizes):
  return jnp.repeat(jnp.arange(sizes.shape[0]), sizes, total_repeat_length=10)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_ragged_dot_close_to_float(fmt):
  kx, kw = jax.random.split(jax.random.key(2))
  x, w = jax.random.normal(kx, (10, 16)), jax.random.normal(kw, (3, 16, 8))
  approx, exact = _ragged_format(x, w, jnp.array([4, 0, 6], jnp.int32), fmt)
  assert 0 < float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact)) < EINSUM_BOUND[fmt]


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quantized_forward_is_the_same_with_every_moe_kernel(quantized, fmt):
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, CFG.vocab_size)
  run = lambda cfg: jax.jit(lambda p, t: transformer.forward(p, t, cfg=cfg)[0])(
      quantized[fmt], tokens)
  blocks = run(CFG)
  for kernel in (dict(moe_impl="ragged_dot"),           # grouped matmul
                 dict(moe_impl="megablox"),             # Pallas kernel, interpret mode
                 dict(moe_dense_max_group=10**6)):      # the dense pass
    np.testing.assert_allclose(run(dataclasses.replace(CFG, **kernel)), blocks,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quantize_embeddings_puts_table_and_head_on_the_grid(params, fmt):
  out = quantize.quantize(params, fmt, AXES, quantize_embeddings=True)
  group = quantize.DEFAULT_GROUP_SIZE if fmt in quantize.GROUPED else None
  # lm_head [D, V] contracts D; the table [V, D] gets one scale per row (over D).
  for name, axis in (("lm_head", 0), ("embed", 1)):
    w = params[name]
    want = linear.quantize_weight(w, (axis,), fmt, group).dequantize()
    assert out[name].dtype == jnp.float32
    np.testing.assert_array_equal(out[name], want)
    rel = float(jnp.linalg.norm(out[name] - w) / jnp.linalg.norm(w))
    assert 0 < rel < EINSUM_BOUND[fmt], (name, rel)
  assert quantize.describe(out)["quantize_embeddings"]
  assert not quantize.describe(quantize.quantize(params, fmt, AXES))["quantize_embeddings"]


def test_float16_casts_and_keeps_the_router_float32(params):
  out = quantize.quantize(params, "float16", AXES)
  assert out["moe"]["router"].dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(out["attn"])} == {jnp.dtype(jnp.float16)}
  assert out["embed"].dtype == out["lm_head"].dtype == jnp.float16


def test_bytes_by_format():
  for cfg in (CFG, MIXED):
    size = {fmt: quantize.weight_bytes(_abstract(cfg, fmt))
            for fmt in ("bfloat16", "float16", "int8", "fp8", "int4")}
    print({k: f"{v / size['bfloat16']:.3f}" for k, v in size.items()})
    assert size["float16"] == size["bfloat16"] and size["fp8"] == size["int8"]
    # 4-bit values + a float32 scale per 32 of them: 0.625 bytes a weight, not 1.03.
    assert size["int4"] < 0.7 * size["int8"]


def test_group_size_must_divide_the_grouped_axis(params):
  with pytest.raises(ValueError, match=r"params leaf \S+: group size 24 does not divide"):
    quantize.quantize(params, "int4", AXES, group_size=24)
