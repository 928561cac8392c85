"""The megablox grouped matmul (Pallas interpret mode on CPU) against ragged_dot and the MoE
layer on it against the dense reference: values and gradients, padded row counts, empty
groups and 8-bit operands. tests/lowering_test.py lowers it for TPU."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax.models import megablox
from minirl_jax.models import moe
from minirl_jax.models import moe_reference
from minirl_jax.models.config import ModelConfig

SIZES = jnp.array([7, 0, 30, 1], jnp.int32)  # 38 rows: not a multiple of a tile


def _operands(rows=40, k=24, n=40):
  kx, kw = jax.random.split(jax.random.key(0))
  return jax.random.normal(kx, (rows, k)), jax.random.normal(kw, (4, k, n)) / 5


@pytest.mark.parametrize("block_rows", [16, 128])
def test_values_and_gradients_equal_ragged_dot(block_rows):
  x, w = _operands()
  loss = lambda dot: lambda x, w: jnp.sum(jnp.sin(dot(x, w, SIZES)))
  gmm = lambda x, w, g: megablox.gmm(x, w, g, block_rows=block_rows)
  v, g = jax.jit(jax.value_and_grad(loss(gmm), argnums=(0, 1)))(x, w)
  v_ref, g_ref = jax.jit(jax.value_and_grad(loss(jax.lax.ragged_dot), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-5)
  # Rows past the groups (38, 39) are zero, as ragged_dot's; their gradient too.
  np.testing.assert_array_equal(gmm(x, w, SIZES)[38:], 0.0)
  np.testing.assert_array_equal(g[0][38:], 0.0)


def test_8bit_operands_accumulate_exactly():
  """int8 goes to XLA's grouped matmul as it is (no kernel, no widening: the TPU lowering
  holds ragged_dot); fp8 through bfloat16 with float32 sums equals float32 throughout."""
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.randint(kx, (40, 64), -127, 128).astype(jnp.int8)
  w = jax.random.randint(kw, (4, 64, 16), -127, 128).astype(jnp.int8)
  gmm = lambda x, w: megablox.gmm(x, w, SIZES, preferred_element_type=jnp.int32)
  got = gmm(x, w)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jax.lax.ragged_dot(x, w, SIZES,
                                                        preferred_element_type=jnp.int32))
  tpu = jax.export.export(jax.jit(gmm), platforms=("tpu",))(x, w).mlir_module()
  assert "chlo.ragged_dot" in tpu and "tpu_custom_call" not in tpu
  x8, w8 = (a.astype(jnp.float32).astype(jnp.float8_e4m3fn) for a in (x // 8, w // 8))
  got = megablox.gmm(x8, w8, SIZES, preferred_element_type=jnp.float32)
  want = jax.lax.ragged_dot(x8.astype(jnp.float32), w8.astype(jnp.float32), SIZES,
                            preferred_element_type=jnp.float32)
  np.testing.assert_array_equal(got, want)


def test_tiling_fits_small_calls_and_caps_large_dims():
  assert megablox.tiling(5, 32, 48, block_rows=128) == (8, 32, 48)
  assert megablox.tiling(1000, 4096, 768, block_rows=256) == (256, 512, 512)
  # Row tiles of a multi-tile call are whole lanes for the gradient kernel.
  assert megablox.tiling(40, 16, 16, block_rows=16) == (128, 16, 16)


def test_moe_layer_equals_the_dense_reference():
  """The whole MoE layer on moe_impl="megablox": values and gradients within float32 1e-5
  of running every token through every expert."""
  cfg = ModelConfig(d_model=16, num_experts=8, top_k=2, expert_ffn_dim=24,
                    moe_impl="megablox", moe_block_size=16, moe_dense_max_group=0)
  k = jax.random.split(jax.random.key(3), 5)
  p = {"router": jax.random.normal(k[0], (16, 8)),
       "w_gate": jax.random.normal(k[1], (8, 16, 24)) / 4,
       "w_up": jax.random.normal(k[2], (8, 16, 24)) / 4,
       "w_down": jax.random.normal(k[3], (8, 24, 16)) / 5}
  x = jax.random.normal(k[4], (3, 37, 16))
  valid = jnp.ones((3, 37), bool)
  sparse = lambda p, x: jnp.sum(jnp.sin(moe.moe_ffn(p, x, cfg, valid_BT=valid)[0]))
  dense = lambda p, x: jnp.sum(jnp.sin(moe_reference.dense_moe_ffn(p, x, cfg)))
  vs, gs = jax.jit(jax.value_and_grad(sparse, argnums=(0, 1)))(p, x)
  vd, gd = jax.jit(jax.value_and_grad(dense, argnums=(0, 1)))(p, x)
  np.testing.assert_allclose(vs, vd, rtol=1e-5)
  chex.assert_trees_all_close(gs, gd, rtol=1e-5, atol=1e-5)
