"""Objectives differentiated through the full MoE transformer."""
from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax.models import config as model_config
from minirl_jax.models import transformer

MODEL = model_config.ModelConfig(
    vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
    num_experts=4, top_k=2, expert_ffn_dim=16, dense_ffn_dim=32)
MASK = jnp.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]], jnp.float32)


def random_params(seed):
  # Shapes from eval_shape and values from numpy: no init compile on a busy CPU.
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda key: transformer.init_params(MODEL, key), jax.random.key(0))
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


@jax.jit
def token_and_sequence_grads(params, tokens_BT):
  """Parameter gradients of MiniRL and J_seq on-policy (theta = theta_old, mu = pi_old)."""
  def logp_and_entropy(params):
    logits_BTV, _ = transformer.forward(params, tokens_BT, cfg=MODEL)
    return (transformer.token_logp(logits_BTV, tokens_BT),
            objectives.token_entropy(logits_BTV))

  (logp_BT, entropy_BT), pullback = jax.vjp(logp_and_entropy, params)
  old_logp_BT = jax.lax.stop_gradient(logp_BT)
  batch = batch_lib.TrainBatch(
      tokens=tokens_BT, attn_mask=jnp.ones(tokens_BT.shape, bool), loss_mask=MASK,
      advantages=jnp.array([1.0, -0.5]), old_logp=old_logp_BT, mu_logp=old_logp_BT,
      num_sequences=jnp.float32(2), num_tokens=jnp.sum(MASK))
  cfg = objectives.ObjectiveConfig()
  (d_token_BT, metrics), (d_seq_BT, _) = (
      jax.grad(fn, has_aux=True)(logp_BT, batch, cfg)
      for fn in (objectives.OBJECTIVES["minirl"], objectives.sequence_loss))
  metrics["policy/entropy"] = objectives.masked_mean(entropy_BT, MASK, batch.num_tokens)
  grad_token, = pullback((d_token_BT, jnp.zeros_like(entropy_BT)))
  grad_seq, = pullback((d_seq_BT, jnp.zeros_like(entropy_BT)))
  return grad_token, grad_seq, metrics, objectives.grad_cosine(grad_token, grad_seq)


class ModelGradientTest(absltest.TestCase):

  def test_token_and_sequence_gradients_through_the_model(self):
    params = random_params(0)
    tokens_BT = jnp.asarray(np.random.default_rng(1).integers(0, MODEL.vocab_size, (2, 6)))
    grad_token, grad_seq, metrics, cosine = token_and_sequence_grads(params, tokens_BT)
    chex.assert_tree_all_finite((grad_token, metrics, grad_seq))
    chex.assert_trees_all_equal_shapes(grad_token, params)
    self.assertGreater(float(jnp.abs(grad_token["moe"]["router"]).max()), 0.0)
    self.assertGreater(float(metrics["policy/entropy"]), 0.0)
    # Every weight is 1 here, so d J_token = sum_i A_i sum_t d log pi / N = d J_seq exactly.
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
    chex.assert_trees_all_close(grad_token, grad_seq, rtol=1e-4, atol=1e-7)


if __name__ == "__main__":
  absltest.main()
