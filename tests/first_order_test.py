"""`rl.first_order`: the estimators' gradients on real rollouts of the smoke model.

At the zero gap and staleness 0 every weight is exactly 1 and nothing is clipped, so
MiniRL's token-level gradient is parallel to J_seq's (the true gradient's estimator) and
equal to MiniRL's without IS: the identities round 3's base point rests on.
"""
import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from minirl_jax import config_base
from minirl_jax import objectives
from minirl_jax.experiments import round3
from minirl_jax.rl import first_order
from minirl_jax.rl import losses
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import train_state
from minirl_jax.rl import wiring
from minirl_jax.rl import data as rl_data
from minirl_jax import sharding

ROOT = pathlib.Path(__file__).parents[1]


def _cos(a, b):
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def smoke():
  config = config_base.sibling(str(ROOT / "configs" / "smoke.py"), "smoke")
  with config.unlocked():
    config.data.reward = "rewards_testlib:odd_length"
  return config


def _setup(config, point):
  s = first_order.settings_for(config, point, noise=0.5)
  mesh = sharding.make_mesh(s.mesh)
  state, _ = train_state.random_init(s, mesh, jax.random.key(0))
  data = rl_data.build(s)
  steps = wiring.bind(s, mesh, data.tokenizer, data.reward_fn)
  prompts = next(data.rl_iterator(s))
  return s, state, steps, prompts


def _chunk_grads(s, state, steps, prompts, rewards, names, params=None):
  """The named estimators' (vector x scale) rows on one sampled chunk with given rewards
  (a random model earns none: the advantages need some)."""
  rollout = steps.sample(steps.quantize(state.params), prompts, jax.random.key(1))
  adv, _ = steps.advantages(rewards)
  batch, _ = steps.pi_old(state.params, rollout, adv)
  ests = tuple(first_order.estimators(s.objective, names))
  u, scale = jax.device_get(first_order.grad_program(s)(
      state.params if params is None else params, batch, rewards, ests=ests))
  return {n: np.asarray(u[i], np.float64) * scale[i] for i, n in enumerate(names)}, batch


def test_zero_gap_token_gradient_is_the_true_gradient_direction(smoke):
  s, state, steps, prompts = _setup(smoke, round3.Point(gap="zero", length="short"))
  assert s.model.compute_dtype == "float32" and s.sampler.dtype == "float32"
  rewards = jax.numpy.asarray(np.random.default_rng(0).integers(0, 2, 16), np.float32)
  g, batch = _chunk_grads(s, state, steps, prompts, rewards,
                          ("seq_is", "minirl", "minirl_no_is", "grpo"))
  np.testing.assert_array_equal(batch.mu_logp, batch.old_logp)
  assert _cos(g["seq_is"], g["minirl"]) == pytest.approx(1.0, abs=1e-5)
  np.testing.assert_allclose(g["minirl"], g["minirl_no_is"], rtol=1e-6, atol=1e-12)
  assert _cos(g["seq_is"], g["grpo"]) < 0.999  # GRPO's 1/|y_i| reweights the responses
  # Uphill and scaled as J_seq's gradient: -grad of the loss, on the whole batch.
  loss = lambda p: objectives.sequence_loss(losses.policy_logp(p, batch, s.model)[0],
                                            batch, s.objective)[0]
  expected = -jax.flatten_util.ravel_pytree(jax.grad(loss)(state.params))[0]
  np.testing.assert_allclose(g["seq_is"], expected, rtol=1e-4, atol=1e-7)
  steps.close()


def test_a_real_gap_separates_with_and_without_is(smoke):
  s, state, steps, prompts = _setup(smoke, round3.Point(gap="int4+noise"))
  assert s.sampler.dtype == "int4" and s.sampler.logit_noise == 0.5
  rewards = jax.numpy.asarray(np.random.default_rng(0).integers(0, 2, 16), np.float32)
  g, batch = _chunk_grads(s, state, steps, prompts, rewards, ("minirl", "minirl_no_is"))
  assert np.max(np.abs(batch.mu_logp - batch.old_logp)) > 0.1
  assert _cos(g["minirl"], g["minirl_no_is"]) < 0.9999
  steps.close()


def test_stale_params_are_the_first_k_updates(smoke):
  s, state, steps, prompts = _setup(smoke, round3.Point(gap="fp8"))
  assert s.rl.global_batch // s.rl.mini_batch_size == 2
  params1, n = first_order.stale_params(steps, state, prompts, jax.random.key(3), k=1)
  assert n == 2
  # The same update by hand: sample, score, pi_old, the first mini-batch of step 0.
  rollout = steps.sample(steps.quantize(state.params), prompts, jax.random.key(3))
  rewards, _ = steps.score(rollout, prompts, count_errors=False)
  batch, _ = steps.pi_old(state.params, rollout, steps.advantages(rewards)[0])
  assert 0 < float(np.mean(rewards)) < 1
  rows = first_order.step_lib.minibatch_rows(s.seed, 0, batch.tokens.shape[0],
                                             s.rl.mini_batch_size)
  own = jax.tree.map(np.copy, jax.device_get(state))
  expected, _ = steps.programs.rl_step(jax.tree.map(jax.numpy.asarray, own),
                                       first_order.step_lib.minibatch(batch, rows[0]))
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(expected.params)):
    np.testing.assert_array_equal(a, b)
  moved = sum(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(params1), jax.tree.leaves(state.params)))
  assert moved > 0
  steps.close()


def test_rows_gram_restores_the_scales():
  rows, other = first_order.Rows(3, 3), first_order.Rows(1, 3)
  vectors = np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]])
  scales = [2.0, 1e20, 0.5]
  for i, (v, sc) in enumerate(zip(vectors, scales)):
    rows.put(i, v, sc)
  other.put(0, np.array([0, 0.5, 1.0]), 3.0)
  full = vectors * np.array(scales)[:, None]
  np.testing.assert_allclose(rows.gram(), full @ full.T, rtol=1e-6)
  np.testing.assert_allclose(rows.gram(other), full @ np.array([[0, 1.5, 3.0]]).T, rtol=1e-6)


def test_settings_for_each_factor(smoke):
  cold = first_order.settings_for(smoke, round3.Point(length="short", replay="r3"))
  options = dict(cold.data.task_options)
  assert (options["min_steps"], options["max_steps"]) == round3.LENGTHS["short"]
  assert cold.rl.routing_replay == "r3" and cold.sampler.dtype == "fp8"
  assert cold.objective.behaviour_logp == "processed" and cold.sampler.logit_noise == 0.0
  zero = first_order.settings_for(smoke, round3.Point(gap="zero"))
  assert zero.objective.behaviour_logp == "pi_old" and zero.sampler.dtype == "float32"
  assert first_order.truth_point(round3.Point(gap="int4", replay="r3")) == round3.Point(
      gap="zero")
  assert isinstance(cold, settings_lib.Settings)
  assert dataclasses.replace(round3.Point(), staleness=3).truth_key == "cold/k3/medium"


def test_script_measures_points_once_and_resumes(tmp_path):
  """scripts/first_order.py on a smoke cold start: two points, their Gram matrices and
  statistics written, nothing measured again on a second call."""
  import json
  import os
  import subprocess
  import sys
  env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # the reward, by module name
  smoke = [f"--config={ROOT / 'configs' / 'smoke.py'}",
           "--config.data.reward=rewards_testlib:odd_length"]
  subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *smoke,
                  "--config.rl.steps=0", "--config.sft.max_steps=2", "--config.log.plots=False",
                  f"--workdir={tmp_path / 'coldstart'}"], cwd=ROOT / "tests", check=True,
                 capture_output=True, timeout=900, env=env)
  command = [sys.executable, str(ROOT / "scripts" / "first_order.py"), *smoke,
             f"--workdir={tmp_path}", "--chunks=2", "--truth_chunks=3",
             "--points=cold/k0/medium/fp8/none,cold/k0/medium/zero/none"]
  run = lambda: json.loads(subprocess.run(command, cwd=ROOT / "tests", check=True,
                                          capture_output=True, text=True, timeout=900,
                                          env=env).stdout.strip().splitlines()[-1])
  assert run()["measured"] == ["cold/k0/medium/fp8/none", "cold/k0/medium/zero/none"]
  out = tmp_path / "first_order"
  zero = np.load(out / "cold__k0__medium__zero__none.npz")
  gram = round3.Gram(zero["gram"], zero["sets"], zero["prompts"])
  assert gram.names == [round3.TRUE, *first_order.ESTIMATORS]
  assert list(zero["prompts"][:3]) == [0, 1, 2] and len(gram.rows("minirl")) == 2
  m, seq = gram.rows("minirl"), gram.rows("seq_is")
  for c in range(2):  # the zero gap: MiniRL parallel to J_seq, chunk by chunk
    K = gram.K
    cos = K[m[c], seq[c]] / np.sqrt(K[m[c], m[c]] * K[seq[c], seq[c]])
    assert cos == pytest.approx(1.0, abs=1e-5)
  summary = json.loads((out / "cold__k0__medium__zero__none.json").read_text())
  assert summary["responses_per_chunk"] == 4 * 4 and len(summary["chunk_stats"]) == 2
  assert len(summary["truth_chunk_stats"]) == 3
  assert summary["chunk_stats"][0]["mismatch/kl_k3"] == 0.0
  fp8 = json.loads((out / "cold__k0__medium__fp8__none.json").read_text())
  assert fp8["chunk_stats"][0]["mismatch/kl_k3"] > 0
  assert fp8["truth_chunk_stats"] == summary["truth_chunk_stats"]  # one true gradient
  estimate, low, high = fp8["stats"]["minirl/cosine"]
  assert -1 <= low <= estimate <= high <= 1
  # Again with one more point of the same group: the two finished points are not measured
  # again, and the new one reads the true gradient back from its cache.
  assert (out / "truth" / "cold__k0__medium_3.npz").exists()
  command[-1] += ",cold/k0/medium/int4/none"
  again = run()
  assert again["measured"] == ["cold/k0/medium/int4/none"] and again["points"] == 3
  int4 = json.loads((out / "cold__k0__medium__int4__none.json").read_text())
  assert int4["truth_chunk_stats"] == summary["truth_chunk_stats"]
  np.testing.assert_array_equal(
      np.load(out / "cold__k0__medium__int4__none.npz")["gram"][:3, :3], zero["gram"][:3, :3])
  report = (out / "report" / "part2.md").read_text()
  assert "| cold/k0/medium/zero/none |" in report and "P3" in report
