"""Sparse dropless dispatch against the dense all-experts reference; routing replay."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax.models import moe
from minirl_jax.models import moe_reference
from minirl_jax.models.config import ModelConfig


def _setup(impl, num_experts=8, top_k=2, tokens=(3, 37), norm=True):
  """`impl` is a `moe_impl`, or "dense_pass": the decode-shaped path forced for every shape."""
  dense = impl == "dense_pass"
  cfg = ModelConfig(d_model=16, num_experts=num_experts, top_k=top_k, expert_ffn_dim=24,
                    moe_impl="blocks" if dense else impl, moe_block_size=16,
                    norm_topk_prob=norm, moe_dense_max_group=10**6 if dense else 0)
  k = jax.random.split(jax.random.key(0), 5)
  e, d, f = num_experts, 16, 24
  p = {"router": jax.random.normal(k[0], (d, e)),
       "w_gate": jax.random.normal(k[1], (e, d, f)) / 4,
       "w_up": jax.random.normal(k[2], (e, d, f)) / 4,
       "w_down": jax.random.normal(k[3], (e, f, d)) / 5}
  x = jax.random.normal(k[4], tokens + (d,))
  return cfg, p, x


@pytest.mark.parametrize("impl,num_experts,top_k,norm", [
    ("blocks", 8, 2, True), ("blocks", 4, 4, False), ("blocks", 16, 1, True),
    ("ragged_dot", 8, 2, True), ("ragged_dot", 16, 1, True),
    ("megablox", 8, 2, True), ("megablox", 4, 4, False),
    ("dense_pass", 8, 2, True), ("dense_pass", 4, 4, False)])
def test_sparse_equals_dense_values_and_grads(impl, num_experts, top_k, norm):
  cfg, p, x = _setup(impl, num_experts, top_k, norm=norm)
  valid = jnp.ones(x.shape[:2], bool)

  def sparse(p, x):
    return jnp.sum(jnp.sin(moe.moe_ffn(p, x, cfg, valid_BT=valid)[0]))

  def dense(p, x):
    return jnp.sum(jnp.sin(moe_reference.dense_moe_ffn(p, x, cfg)))

  vs, gs = jax.jit(jax.value_and_grad(sparse, argnums=(0, 1)))(p, x)
  vd, gd = jax.jit(jax.value_and_grad(dense, argnums=(0, 1)))(p, x)
  np.testing.assert_allclose(vs, vd, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(gs, gd, rtol=1e-4, atol=1e-5)


def test_all_tokens_to_one_expert_is_not_dropped():
  cfg, p, x = _setup("blocks", num_experts=8, top_k=2)
  x = jnp.abs(x)
  p = dict(p, router=p["router"].at[:, 3].add(100.0))  # expert 3 wins for every token
  valid = jnp.ones(x.shape[:2], bool)
  y, routing = moe.moe_ffn(p, x, cfg, valid_BT=valid)
  assert bool(jnp.all(routing.ids_BTk[..., 0] == 3))
  np.testing.assert_allclose(y, moe_reference.dense_moe_ffn(p, x, cfg), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(routing.load_E[3], 0.5, rtol=1e-6)


def test_replay_own_routing_is_identity_and_minus_one_routes_live():
  cfg, p, x = _setup("blocks")
  valid = jnp.ones(x.shape[:2], bool)
  y, r = moe.moe_ffn(p, x, cfg, valid_BT=valid)
  y_replay, r_replay = moe.moe_ffn(p, x, cfg, valid_BT=valid, replay_BTk=r.ids_BTk)
  np.testing.assert_array_equal(y, y_replay)
  live = jnp.full_like(r.ids_BTk, -1)
  y_live, r_live = moe.moe_ffn(p, x, cfg, valid_BT=valid, replay_BTk=live)
  np.testing.assert_array_equal(y, y_live)
  np.testing.assert_array_equal(r.ids_BTk, r_live.ids_BTk)


def test_replay_other_experts_runs_them_with_live_gates():
  cfg, p, x = _setup("blocks")
  valid = jnp.ones(x.shape[:2], bool)
  y, r = moe.moe_ffn(p, x, cfg, valid_BT=valid)
  other = (r.ids_BTk.astype(jnp.int32) + 1) % cfg.num_experts
  y_other, r_other = moe.moe_ffn(p, x, cfg, valid_BT=valid, replay_BTk=other)
  np.testing.assert_array_equal(r_other.ids_BTk, other)
  assert float(jnp.max(jnp.abs(y - y_other))) > 1e-2
  np.testing.assert_allclose(
      y_other, moe_reference.dense_moe_ffn(p, x, cfg, replay_BTk=other), rtol=1e-5, atol=1e-5)


def test_router_gets_gradient_under_replay():
  cfg, p, x = _setup("blocks")
  valid = jnp.ones(x.shape[:2], bool)
  _, r = moe.moe_ffn(p, x, cfg, valid_BT=valid)
  replay = (r.ids_BTk.astype(jnp.int32) + 1) % cfg.num_experts
  g = jax.grad(lambda p: jnp.sum(moe.moe_ffn(p, x, cfg, valid_BT=valid, replay_BTk=replay)[0]
                                 ** 2))(p)
  assert float(jnp.linalg.norm(g["router"])) > 1e-3


def test_route_renormalises_top_k_weights():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
  ids, w, _ = moe.route(logits, 2, True)
  np.testing.assert_array_equal(ids, [[3, 2]])
  np.testing.assert_allclose(w, [[0.4 / 0.7, 0.3 / 0.7]], rtol=1e-6)
  _, w_raw, _ = moe.route(logits, 2, False)
  np.testing.assert_allclose(w_raw, [[0.4, 0.3]], rtol=1e-6)


def test_aux_losses_match_formulas_and_ignore_padding():
  cfg, p, x = _setup("blocks", tokens=(2, 5))
  valid = jnp.array([[True] * 5, [False, False, True, True, True]])
  _, r = jax.jit(lambda p, x: moe.moe_ffn(p, x, cfg, valid_BT=valid))(p, x)
  m = np.asarray(valid).reshape(-1)
  probs = np.asarray(r.probs_BTE).reshape(10, -1)[m]
  ids = np.asarray(r.ids_BTk).reshape(10, -1)[m]
  counts = np.array([(ids == e).sum() for e in range(cfg.num_experts)])
  frac = counts / m.sum()
  expected_lb = cfg.num_experts * np.sum(frac * probs.mean(0))
  np.testing.assert_allclose(r.load_balance_loss, expected_lb, rtol=1e-5)
  np.testing.assert_allclose(r.load_E, frac / cfg.top_k, rtol=1e-6)
  lse = np.log(np.exp(np.asarray(r.logits_BTE).reshape(10, -1)[m]).sum(-1))
  np.testing.assert_allclose(r.router_z_loss, np.mean(lse ** 2), rtol=1e-5)
