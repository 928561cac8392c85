"""Properties of every objective: shard additivity, finiteness on hostile inputs, one trace."""
import functools

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
from minirl_jax.objectives import config
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


if __name__ == "__main__":
  absltest.main()
