"""models.flash: the Pallas flash attention kernel (TPU interpret mode on this CPU) against
layers.attend at every real token, values and gradients; the model's plumbing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from minirl_jax.models import flash
from minirl_jax.models import layers
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig

B, T, H, G, D = 2, 200, 4, 2, 32  # T not a whole block: the kernel pads it


def _inputs():
  q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
      jax.random.split(jax.random.key(0), 3), [(B, T, H, D), (B, T, G, D), (B, T, G, D)]))
  valid = np.ones((B, T), bool)
  valid[0, :37] = False   # left padding (a prompt bucket)
  valid[1, 150:] = False  # right padding (a response that ended)
  return q, k, v, jnp.asarray(valid)


def _on_real_tokens(attend, q, k, v, valid):
  """A scalar of the outputs at real tokens only, and its gradients."""
  weights = jax.random.normal(jax.random.key(1), (B, T, H, D))
  loss = lambda q, k, v: jnp.sum(jnp.where(valid[..., None, None], attend(q, k, v), 0) * weights)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("block", [128, 256])
def test_the_kernel_equals_xla_attention_at_real_tokens_values_and_gradients(block):
  q, k, v, valid = _inputs()
  xla = lambda q, k, v: layers.attend(q, k, v, valid, jnp.arange(T), chunk=64)
  kernel = lambda q, k, v: flash.kernel_attend(q, k, v, valid, block=block)
  want, want_grads = _on_real_tokens(xla, q, k, v, valid)
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = jax.jit(lambda q, k, v: _on_real_tokens(kernel, q, k, v, valid))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5)
  assert float(jnp.abs(want_grads[1][0, :37]).max()) == 0.0  # pads' keys are never seen


@pytest.mark.parametrize("length,chunk,block", [(200, 64, 128), (2048, 512, 512),
                                                (33_792, 256, 256), (100, 0, 128)])
def test_blocks_are_whole_lanes_and_at_most_the_sequence(length, chunk, block):
  assert flash.block_size(length, chunk) == block


def test_the_model_off_tpu_runs_xla_attention_whatever_the_setting():
  cfg = ModelConfig(attention_chunk=16)
  params = transformer.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
  mask = jnp.arange(24)[None] >= jnp.array([[0], [5]])
  run = lambda c: transformer.forward(params, tokens, cfg=c, attn_mask_BT=mask)[0]
  flash_cfg = ModelConfig(attention_chunk=16, attention_impl="flash")
  np.testing.assert_array_equal(run(flash_cfg), run(cfg))


def test_kernel_flops_count_the_blocks_the_kernel_computes():
  dims = [[2, 4, 1024, 64], [2, 4, 1024, 64], [2, 1024]]
  pairs = 4 * 5 / 2  # 4 blocks of 256 a side: the diagonal and below
  per_pair = 2 * 256 * 256 * 64  # one matmul of two blocks
  name = "jit(rl_step)/shard_map/flash_block_256/jit(flash_attention)/"
  assert flash.kernel_flops(name + "pallas_call", dims) == 2 * 4 * pairs * 2 * per_pair
  assert flash.kernel_flops(name + "flash_mha_bwd_dkv_block_q=256/pallas_call",
                            dims) == 2 * 4 * pairs * 4 * per_pair
  assert flash.kernel_flops(name + "flash_mha_bwd_dq_block_q=256/pallas_call",
                            dims) == 2 * 4 * pairs * 3 * per_pair
  assert flash.kernel_flops("jit(rl_step)/jit(gmm)/pallas_call", dims) is None
