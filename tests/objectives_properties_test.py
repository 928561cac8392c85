"""Properties of every objective: shard additivity, finiteness on hostile inputs, one trace,
and exact zeros, caps and finiteness at extreme inputs over the whole config grid."""
import dataclasses
import functools
import itertools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import objectives
from minirl_jax.objectives import advantages
from minirl_jax.objectives import config
from minirl_jax.objectives import diagnostics
from minirl_jax.objectives import minirl
from minirl_jax.objectives import rollout_correction
from minirl_jax.objectives import tokens
import objectives_testlib as lib

CASES = (
    ("minirl", objectives.OBJECTIVES["minirl"], {}),
    ("minirl_length_norm", objectives.OBJECTIVES["minirl"], dict(length_norm=True)),
    ("minirl_no_is_no_clip_no_cap",
     objectives.OBJECTIVES["minirl"], dict(train_infer_is=False, clip=False, tis_cap=None)),
    ("minirl_uncapped_pi_old_mu",
     objectives.OBJECTIVES["minirl"], dict(tis_cap=None, tis_target="pi_old_mu")),
    ("grpo", objectives.OBJECTIVES["grpo"], dict(name="grpo")),
    ("grpo_is_no_clip",
     objectives.OBJECTIVES["grpo"], dict(name="grpo", train_infer_is=True, clip=False)),
    ("cispo", objectives.OBJECTIVES["cispo"], dict(name="cispo")),
    ("cispo_is_no_clip_no_cap", objectives.OBJECTIVES["cispo"],
     dict(name="cispo", train_infer_is=True, clip=False, tis_cap=None)),
    ("cispo_group_token_norm", objectives.OBJECTIVES["cispo"],
     dict(name="cispo", token_norm="group")),
    ("minirl_seq_tis_mis", objectives.OBJECTIVES["minirl"],
     dict(is_level="sequence", is_bounds=(0.3, 3.0))),
    ("minirl_seq_uncapped_length_norm", objectives.OBJECTIVES["minirl"],
     dict(is_level="sequence", tis_cap=None, length_norm=True)),
    ("minirl_geo_mis", objectives.OBJECTIVES["minirl"],
     dict(is_level="geometric", is_bounds=(0.7, 1.4))),
    ("minirl_geo_rs_no_is", objectives.OBJECTIVES["minirl"],
     dict(is_level="geometric", is_bounds=(0.7, 1.4), train_infer_is=False)),
    ("sequence", objectives.sequence_loss, {}),
)


@jax.jit
def all_cases(logp, batch):
  """(loss, metrics), grad of every case: one compile per shape for the whole module."""
  out = {}
  for name, fn, overrides in CASES:
    loss_fn = functools.partial(fn, cfg=config.ObjectiveConfig(**overrides))
    out[name] = jax.value_and_grad(loss_fn, has_aux=True)(logp, batch)
  return out


def random_batch(seed, b=4, t=5):
  rng = np.random.default_rng(seed)
  old, mu, pi = (rng.uniform(0.05, 1.0, (b, t)) for _ in range(3))
  lengths = np.array([4, 2, 3, 0])  # including an empty response
  mask = (np.arange(t)[None, :] >= t - lengths[:, None]).astype(np.float32)
  batch = lib.make_batch(old, mu, mask, rng.normal(size=b),
                         group_length_mean=lib.group_means(mask, 2))
  return jnp.log(jnp.asarray(pi, jnp.float32)), batch


# The whole config grid: MiniRL with every is_level x train_infer_is x length_norm x clip, the
# other cap settings, GRPO and CISPO with and without their ablations, and J_seq (Eq. 1).
_LEVELS = (("token", None), ("sequence", (0.5, 2.0)), ("geometric", (0.7, 1.4)))
_ON_OFF = (True, False)
GRID = tuple(
    (f"minirl_{level}_is{use_is:d}_norm{norm:d}_clip{clip:d}", "minirl",
     config.ObjectiveConfig(is_level=level, is_bounds=bounds, train_infer_is=use_is,
                            length_norm=norm, clip=clip))
    for (level, bounds), use_is, norm, clip in itertools.product(_LEVELS, *[_ON_OFF] * 3)
) + tuple(
    (f"{name}_is{use_is:d}_clip{clip:d}", name,
     config.ObjectiveConfig(name=name, train_infer_is=use_is, clip=clip))
    for name, use_is, clip in itertools.product(("grpo", "cispo"), _ON_OFF, _ON_OFF)
) + (
    ("minirl_pi_old_mu", "minirl", config.ObjectiveConfig(tis_target="pi_old_mu")),
    ("minirl_uncapped", "minirl", config.ObjectiveConfig(tis_cap=None)),
    ("minirl_seq_tis", "minirl", config.ObjectiveConfig(is_level="sequence")),
    ("minirl_seq_mis_uncapped", "minirl", config.ObjectiveConfig(
        is_level="sequence", is_bounds=(0.0, math.inf), tis_cap=None)),
    ("grpo_token_sum", "grpo", config.ObjectiveConfig(name="grpo", length_norm=False)),
    ("cispo_token_sum", "cispo", config.ObjectiveConfig(name="cispo", length_norm=False)),
    ("cispo_group_token_norm", "cispo",
     config.ObjectiveConfig(name="cispo", token_norm="group")),
    ("sequence", "sequence", config.ObjectiveConfig()),
)
_LOSS_FNS = {**objectives.OBJECTIVES, "sequence": objectives.sequence_loss}


@jax.jit
def grid_cases(logp, batch):
  """(loss, metrics), grad of every GRID case; one compile per shape."""
  return {case: jax.value_and_grad(functools.partial(_LOSS_FNS[name], cfg=cfg),
                                   has_aux=True)(logp, batch)
          for case, name, cfg in GRID}


# Log-probs whose pairwise gaps reach +-50 and +-100 nats (ratios e^+-50, e^+-100).
EXTREME_LOGP = st.sampled_from([0.0, -1e-6, -0.5, -50.0, -100.0])
MASKS = hnp.arrays(np.float32, (4, 5), elements=st.sampled_from([0.0, 1.0]))
ADVANTAGES = hnp.arrays(np.float32, (4,), elements=st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5]))
# Entries that stay normal floats at every scale below (XLA on CPU flushes subnormals to 0).
GRAD_ENTRIES = (st.just(0.0) | st.floats(2.0**-10, 4.0, width=32)
                | st.floats(-4.0, -2.0**-10, width=32))
# Row 0: pi_theta e^50 above pi_old, e^100 above mu; row 1 the reverse; rows 2-3 mixed.
_GAPS = np.array([[0.0, -50.0, -100.0], [-100.0, -50.0, 0.0], [-50.0, 0.0, -100.0],
                  [-50.0, -100.0, 0.0]], np.float32)
STEEP_LOGPS = np.broadcast_to(_GAPS.T[:, :, None], (3, 4, 5)).copy()


def grid_inputs(logps, mask, adv):
  """(logp, batch) of a [4, 5] batch of two prompt groups from stacked (logp, old, mu)."""
  logp, old, mu = logps
  batch = lib.batch_from_logp(old, mu, mask, adv, group_length_mean=lib.group_means(mask, 2))
  return jnp.asarray(logp, jnp.float32), batch


def weight_cap(name, cfg):
  """The cap on `is/weight_max`, or None: MiniRL's "pi_old_mu" weight carries pi_theta/pi_old."""
  if name == "sequence" or (name == "minirl" and cfg.tis_target == "pi_old_mu"):
    return None
  return cfg.tis_cap


def token_grad_bound(name, cfg):
  """K with |d loss / d logp_t| <= K |A| / num_sequences for every token, or None.

  MiniRL's weight is sg[min(pi_theta/mu_old, C)] or 1 (config docstring); the sequence
  level multiplies min(prod w_t, C) by the unbounded pi_theta/pi_old.
  """
  if name != "minirl":
    return None
  if not cfg.use_train_infer_is:
    return 1.0
  if cfg.is_level == "sequence" or cfg.tis_target != "pi_theta_mu" or cfg.tis_cap is None:
    return None
  return cfg.tis_cap


class PropertiesTest(parameterized.TestCase):

  def test_shards_add_up_to_the_full_batch(self):
    logp, batch = random_batch(0)
    full = all_cases(logp, batch)
    halves = [all_cases(logp[s], jax.tree.map(lambda x, s=s: x[s] if x.ndim else x, batch))
              for s in (slice(0, 2), slice(2, 4))]
    for name, ((loss, metrics), grad) in full.items():
      (loss_a, metrics_a), grad_a = halves[0][name]
      (loss_b, metrics_b), grad_b = halves[1][name]
      np.testing.assert_allclose(loss_a + loss_b, loss, rtol=1e-5, err_msg=name)
      np.testing.assert_allclose(jnp.concatenate([grad_a, grad_b]), grad, rtol=1e-5,
                                 err_msg=name)
      for key, value in metrics.items():
        combine = jnp.maximum if key.endswith("_max") else jnp.add
        np.testing.assert_allclose(combine(metrics_a[key], metrics_b[key]), value,
                                   rtol=1e-5, atol=1e-7, err_msg=f"{name} {key}")

  @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
  @hypothesis.given(
      # [2, 5] as a shard of `random_batch`, to reuse its compiled functions.
      logps=hnp.arrays(np.float32, (3, 2, 5),
                       elements=st.sampled_from([0.0, -1e-6, -0.7, -30.0, -1e4, -np.inf])),
      mask=hnp.arrays(np.float32, (2, 5), elements=st.sampled_from([0.0, 1.0])),
      adv=hnp.arrays(np.float32, (2,), elements=st.sampled_from([0.0, 1.0, -2.5, 30.0])),
      pad=st.sampled_from([0.0, -np.inf, np.nan]),
  )
  def test_finite_on_hostile_inputs(self, logps, mask, adv, pad):
    # Off the mask every log-prob is garbage (pad); on it, gaps reach 1e4 nats or infinity.
    logp, old, mu = (np.where(mask > 0, x, pad) for x in logps)
    batch = lib.batch_from_logp(old, mu, mask, adv,
                                group_length_mean=lib.group_means(mask, 2))
    chex.assert_tree_all_finite(all_cases(logp, batch))

  @parameterized.named_parameters(
      *((name, fn, name) for name, fn in objectives.OBJECTIVES.items()),
      ("sequence", objectives.sequence_loss, "minirl"))
  def test_jitted_loss_traces_once(self, fn, name):
    chex.clear_trace_counter()
    traced = jax.jit(chex.assert_max_traces(fn, n=1), static_argnames="cfg")
    for seed in (1, 2):  # new values, same shapes, an equal but distinct config
      logp, batch = random_batch(seed)
      traced(logp, batch, cfg=config.ObjectiveConfig(name=name))


class ExtremeInputsTest(absltest.TestCase):
  """Exact zeros where there is no signal, caps that hold, finite values at +-100 nat gaps."""

  @hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
  @hypothesis.given(
      logps=hnp.arrays(np.float32, (3, 4, 5), elements=EXTREME_LOGP), mask=MASKS,
      rewards=st.lists(st.sampled_from([0.0, 1.0, 0.1, -7.3, 1e-30, 1e30]),
                       min_size=2, max_size=2),
      normalize_std=st.booleans(), std_ddof=st.sampled_from([0, 1]))
  def test_equal_rewards_give_zero_loss_and_gradient(self, logps, mask, rewards,
                                                     normalize_std, std_ddof):
    rewards = jnp.repeat(jnp.asarray(rewards, jnp.float32), 2)  # each group all-equal
    adv = advantages.group_advantages(rewards, 2, normalize_std, std_ddof)
    np.testing.assert_array_equal(adv, 0.0)
    for case, ((loss, metrics), grad) in grid_cases(*grid_inputs(logps, mask, adv)).items():
      self.assertEqual(loss, 0.0, msg=case)
      np.testing.assert_array_equal(grad, 0.0, err_msg=case)
      chex.assert_tree_all_finite(metrics)

  @hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
  @hypothesis.given(
      logps=hnp.arrays(np.float32, (3, 4, 5), elements=EXTREME_LOGP), mask=MASKS,
      dead=hnp.arrays(bool, (4,)), adv=ADVANTAGES,
      pad=st.sampled_from([np.nan, -np.inf, np.inf, -50.0]))
  @hypothesis.example(logps=STEEP_LOGPS, mask=np.ones((4, 5), np.float32),
                      dead=np.array([False, False, True, True]),  # a fully masked group
                      adv=np.array([1.0, -1.0, 2.5, -2.5], np.float32), pad=np.nan)
  @hypothesis.example(logps=STEEP_LOGPS, mask=np.ones((4, 5), np.float32),
                      dead=np.ones(4, bool), adv=np.ones(4, np.float32), pad=np.nan)
  def test_masked_tokens_get_zero_gradient_and_leak_nothing(self, logps, mask, dead, adv, pad):
    mask = mask * ~dead[:, None]
    got = grid_cases(*grid_inputs(np.where(mask > 0, logps, pad), mask, adv))
    clean = grid_cases(*grid_inputs(np.where(mask > 0, logps, 0.0), mask, adv))
    chex.assert_trees_all_equal(got, clean)  # bit for bit: the pad reaches nothing
    for case, ((loss, metrics), grad) in got.items():
      chex.assert_tree_all_finite((loss, metrics, grad))
      np.testing.assert_array_equal(np.where(mask > 0, 0.0, grad), 0.0, err_msg=case)
      if not mask.any():
        self.assertEqual(loss, 0.0, msg=case)
        np.testing.assert_array_equal(grad, 0.0, err_msg=case)

  @hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
  @hypothesis.given(
      logps=hnp.arrays(np.float32, (3, 4, 5), elements=EXTREME_LOGP), mask=MASKS,
      adv=ADVANTAGES)
  @hypothesis.example(logps=STEEP_LOGPS, mask=np.ones((4, 5), np.float32),
                      adv=np.array([1.0, -1.0, 2.5, -2.5], np.float32))
  @hypothesis.example(logps=STEEP_LOGPS, mask=np.ones((4, 5), np.float32),
                      adv=np.array([-1.0, 1.0, -2.5, 2.5], np.float32))
  def test_extreme_gaps_stay_finite_and_capped(self, logps, mask, adv):
    logp, batch = grid_inputs(logps, mask, adv)
    out = grid_cases(logp, batch)
    max_adv = np.abs(adv).max()
    for case, name, cfg in GRID:
      (loss, metrics), grad = out[case]
      chex.assert_tree_all_finite((loss, metrics, grad))
      cap = weight_cap(name, cfg)
      if cap is not None:
        self.assertLessEqual(metrics["is/weight_max"], cap, msg=case)
      if name == "minirl" and cfg.is_level != "token" and cfg.tis_cap is not None:
        self.assertLessEqual(metrics["is/seq_weight_max"], cfg.tis_cap, msg=case)
      if name != "sequence":
        self.assertLessEqual(metrics["policy/ratio_max"], np.exp(np.float32(20.0)), msg=case)
        for key in ("policy/clip_frac", "is/frac_truncated"):
          self.assertBetween(metrics[key], 0.0, 1.0, msg=f"{case} {key}")
      bound = token_grad_bound(name, cfg)
      if bound is not None:  # (1 + 1e-6): float32 rounding of w * A / N
        self.assertLessEqual(np.abs(grad).max(),
                             bound * max_adv / batch.num_sequences * (1 + 1e-6), msg=case)

  def test_empty_batch_is_all_zeros(self):
    empty = np.zeros((3, 0, 5), np.float32)
    adv = advantages.group_advantages(jnp.zeros((0,)), 2, normalize_std=True)
    chex.assert_shape(adv, (0,))
    logp, batch = grid_inputs(empty, empty[0], adv)
    for case, ((loss, metrics), grad) in grid_cases(logp, batch).items():
      self.assertEqual(loss, 0.0, msg=case)
      chex.assert_shape(grad, (0, 5))
      for key, value in metrics.items():
        self.assertEqual(value, 0.0, msg=f"{case} {key}")

  @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
  @hypothesis.given(
      rewards=hnp.arrays(np.float32, (3, 4),
                         elements=st.sampled_from([0.0, 1.0, 0.1, 0.3, -7.3, 1e-30, 1e6])),
      equal=hnp.arrays(bool, (3,)), normalize_std=st.booleans(), std_ddof=st.sampled_from([0, 1]))
  def test_group_advantages_at_extreme_rewards(self, rewards, equal, normalize_std, std_ddof):
    rewards = np.where(equal[:, None], rewards[:, :1], rewards)
    adv = np.asarray(advantages.group_advantages(
        jnp.asarray(rewards).reshape(-1), 4, normalize_std, std_ddof)).reshape(3, 4)
    chex.assert_tree_all_finite(adv)
    np.testing.assert_array_equal(adv[equal], 0.0)
    scale = np.abs(adv).max(-1) + np.abs(rewards).max(-1) * (not normalize_std)
    np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-6 * float(scale.max()) + 1e-30)
    if normalize_std:  # |z| <= sqrt(G - 1) for any G values
      self.assertLessEqual(np.abs(adv).max(), np.sqrt(3.0) * (1 + 1e-6))

  @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
  @hypothesis.given(logps=hnp.arrays(np.float32, (3, 4, 5), elements=EXTREME_LOGP),
                    mask=MASKS, cap=st.sampled_from([5.0, 2.0, None]))
  def test_is_weights_capped_at_extreme_log_ratios(self, logps, mask, cap):
    logp, old, mu = (tokens.sanitize_logp(jnp.asarray(x), mask) for x in logps)
    limit = np.exp(np.float32(tokens.LOG_RATIO_LIMIT))
    top = limit if cap is None else cap
    weight, truncated = tokens.truncate(logp - mu, cap)
    self.assertLessEqual(jnp.max(weight), top)
    self.assertGreaterEqual(jnp.min(weight), 1 / limit)
    np.testing.assert_array_equal(truncated, (cap is not None) & (logp - mu > np.log(top)))
    cfg = config.ObjectiveConfig(tis_cap=cap)
    self.assertLessEqual(jnp.max(minirl.is_weight(logp, old, mu, cfg)[0]), top)
    old_mu = dataclasses.replace(cfg, tis_target="pi_old_mu")
    chex.assert_tree_all_finite(minirl.is_weight(logp, old, mu, old_mu)[0])
    batch = grid_inputs(logps, mask, np.zeros(4, np.float32))[1]
    for level, bounds in _LEVELS[1:]:
      corr = rollout_correction.sequence_correction(
          old, mu, batch, dataclasses.replace(cfg, is_level=level, is_bounds=bounds))
      chex.assert_tree_all_finite(corr)
      self.assertLessEqual(jnp.max(corr.weight_B), top)
      # A sequence without train-infer gap (an empty one too) is always kept.
      np.testing.assert_array_equal(corr.keep_B[corr.log_w_B == 0], True)

  @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
  @hypothesis.given(logps=hnp.arrays(np.float32, (3, 4, 5), elements=EXTREME_LOGP),
                    mask=MASKS)
  def test_first_order_error_and_mismatch_at_extreme_gaps(self, logps, mask):
    logp, batch = grid_inputs(logps, mask, np.zeros(4, np.float32))
    error = np.asarray(objectives.first_order_error(logp, batch))
    chex.assert_tree_all_finite(error)
    self.assertGreaterEqual(error.min(), 0.0)
    # No loss token, or pi_theta = mu_old on every one: prod_t(1 + 0) = 1 + 0 exactly.
    no_gap = ((np.asarray(logp) == logps[2]) | (mask == 0)).all(-1)
    np.testing.assert_array_equal(error[no_gap], 0.0)
    mismatch = diagnostics.mismatch_metrics(batch)
    chex.assert_tree_all_finite(mismatch)
    self.assertGreaterEqual(mismatch["mismatch/kl_k3"], 0.0)
    self.assertGreaterEqual(mismatch["mismatch/abs_log_pi_old_mu"], 0.0)

  @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
  @hypothesis.given(logits=hnp.arrays(np.float32, (2, 3, 4), elements=st.sampled_from(
      [0.0, 50.0, -50.0, 1e30, -1e30, -np.inf])))
  def test_entropy_at_extreme_logits(self, logits):
    logits[..., 0] = np.where(np.isinf(logits[..., 0]), 0.0, logits[..., 0])  # one finite
    entropy, grad = jax.value_and_grad(
        lambda x: jnp.sum(objectives.token_entropy(x)))(jnp.asarray(logits))
    chex.assert_tree_all_finite((entropy, grad))
    per_token = objectives.token_entropy(jnp.asarray(logits))
    self.assertGreaterEqual(jnp.min(per_token), 0.0)
    self.assertLessEqual(jnp.max(per_token), np.log(4.0) * (1 + 1e-6))

  @hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
  @hypothesis.given(
      a=hnp.arrays(np.float32, (2, 3), elements=GRAD_ENTRIES),
      b=hnp.arrays(np.float32, (2, 3), elements=GRAD_ENTRIES),
      scale_a=st.sampled_from([1e-30, 1e-20, 1.0, 1e20, 1e30]),
      scale_b=st.sampled_from([1e-30, 1e-20, 1.0, 1e20, 1e30]))
  @hypothesis.example(a=np.array([[1, 2, 3], [0, 0, 0]], np.float32),
                      b=np.array([[1, 2, 2], [0, 0, 0]], np.float32), scale_a=1e20,
                      scale_b=1e20)
  def test_grad_cosine_is_scale_free(self, a, b, scale_a, scale_b):
    # J_seq's gradient passes 1e19 (squares overflow float32) once a sequence's log-weight
    # passes ~44 nats; tiny gradients underflow the other way.
    a, b = np.float32(a * scale_a), np.float32(b * scale_b)
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    want = a64 @ b64 / denom if denom > 0 else 0.0
    got = diagnostics.grad_cosine({"w": a[0], "v": a[1:]}, {"w": b[0], "v": b[1:]})
    np.testing.assert_allclose(got, want, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
