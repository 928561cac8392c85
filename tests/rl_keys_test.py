"""The run's named random streams are the fixed fold_ins recorded runs were made with."""
import jax
import numpy as np

from minirl_jax.rl import keys


def _same(a, b) -> bool:
  return np.array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_each_stream_is_its_fixed_fold_in_of_the_seed():
  root = jax.random.key(7)
  k = keys.Keys.of(7)
  assert _same(k.init, jax.random.fold_in(root, 0))
  assert _same(k.rl_eval, jax.random.fold_in(root, 1))
  for step in (1, 50, 2000):
    assert _same(k.sft_eval(step), jax.random.fold_in(root, step))
    assert _same(k.rollout(step), jax.random.fold_in(root, 1000 + step))


def test_streams_differ_where_a_run_draws_them_together():
  k = keys.Keys.of(0)
  draws = [k.init, k.rl_eval, k.rollout(1), k.rollout(2), k.sft_eval(2)]
  data = {jax.random.key_data(x).tobytes() for x in draws}
  assert len(data) == len(draws)
