"""Tests for minirl_jax.rl.rollout.score: rewards of a rollout, and the failing-reward stop."""
import importlib.util
import pathlib
import types

import numpy as np
import pytest

from minirl_jax import errors
from minirl_jax import sharding
from minirl_jax.rl import settings
from minirl_jax.rl import step

_WORDS = {1: "ok", 2: "bad"}
_PROMPTS = {"prompt": np.array(["p0", "p1"]), "answer": np.array(["a", "a"])}  # G = 4


def _fails_on_bad(prompt, completion, answer):
  del prompt, answer
  if completion == "bad":
    raise ValueError("bad completion")
  return 1.0


class _Words:
  """Decodes token 1 as "ok", 2 as "bad"."""

  def decode(self, ids):
    return "".join(_WORDS[int(i)] for i in ids)


def _rollout(words):
  ids = {w: i for i, w in _WORDS.items()}
  tokens = np.array([[0, ids[w]] for w in words], np.int32)  # a prompt token, then the word
  return types.SimpleNamespace(tokens=tokens, completion_mask=np.array([[0, 1]] * len(words)))


def _bound():
  spec = importlib.util.spec_from_file_location(
      "smoke", pathlib.Path(__file__).parents[1] / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  s = settings.from_config(module.get_config())
  assert s.rl.group_size == 4 and s.data.reward_max_error_frac == 0.5
  return step.bind(s, sharding.make_mesh({}), _Words(), _fails_on_bad)


def test_training_steps_stop_a_failing_reward_and_evaluation_never_does():
  fns = _bound()
  eval_score = fns.evaluate.keywords["score_fn"]
  bad = _rollout(["bad", "ok", "bad", "bad"] + ["bad", "bad", "ok", "ok"])  # 5/8 fail
  good = _rollout(["ok"] * 8)
  try:
    rewards, m = fns.score(bad, _PROMPTS)
    np.testing.assert_array_equal(rewards, [0, 1, 0, 0, 0, 0, 1, 1])
    assert (m["reward/errors"], m["reward/timeouts"]) == (5.0, 0.0)
    assert float(m["reward/mean"]) == 3 / 8
    fns.score(bad, _PROMPTS)
    fns.score(good, _PROMPTS)  # a good step resets the count
    for _ in range(5):
      eval_score(bad, _PROMPTS, group_size=4)  # evaluation neither counts nor resets
    fns.score(bad, _PROMPTS)
    eval_score(good, _PROMPTS, group_size=4)
    fns.score(bad, _PROMPTS)
    with pytest.raises(errors.RunStopped) as stopped:
      fns.score(bad, _PROMPTS)
    assert str(stopped.value) == (
        "reward function failed on 5/8 calls (62.5%) for 3 steps in a row "
        "(data.reward_max_error_frac=0.5); first error: ValueError: bad completion (prompt 0)")
  finally:
    fns.close()


def test_sampler_batch_size_decodes_slices_with_their_own_keys():
  """sampler.batch_size=4 of 8 rows: two generate calls, each slice as if sampled alone."""
  import dataclasses

  import jax

  from minirl_jax.models import transformer
  from minirl_jax.rl import rollout
  from minirl_jax.sampling import quantize
  from minirl_jax.sampling import sampler
  from minirl_jax.sampling.config import SamplerConfig

  cfg = transformer.ModelConfig(vocab_size=16, num_experts=4, top_k=2)
  params = quantize.for_sampler(transformer.init_params(cfg, jax.random.key(0)),
                                SamplerConfig(dtype="float32"), transformer.param_axes(cfg))
  prompts = {"prompt_tokens": np.array([[3, 4, 5], [0, 6, 7]], np.int32),
             "prompt_mask": np.array([[1, 1, 1], [0, 1, 1]], bool)}
  scfg = SamplerConfig(dtype="float32", max_new_tokens=5, prompt_bucket=4, eos_ids=())
  mesh, key = sharding.make_mesh({}), jax.random.key(3)
  sliced = rollout.sample(params, prompts, key, group_size=4, model_cfg=cfg, mesh=mesh,
                          sampler_cfg=dataclasses.replace(scfg, batch_size=4))
  whole = rollout.sample(params, prompts, key, group_size=4, model_cfg=cfg, mesh=mesh,
                         sampler_cfg=scfg)
  assert sliced.tokens.shape == whole.tokens.shape == (8, 9)
  assert sliced.routing_mu.shape == whole.routing_mu.shape
  tokens = np.repeat(prompts["prompt_tokens"], 4, axis=0)
  lengths = np.repeat(prompts["prompt_mask"].sum(axis=1), 4, axis=0)
  for i in range(2):
    alone = sampler.generate(params, tokens[4 * i:4 * i + 4], lengths[4 * i:4 * i + 4],
                             jax.random.fold_in(key, i), model_cfg=cfg, sampler_cfg=scfg)
    np.testing.assert_array_equal(sliced.tokens[4 * i:4 * i + 4], alone.tokens)
    np.testing.assert_array_equal(sliced.routing_mu[:, 4 * i:4 * i + 4], alone.routing_mu)
    np.testing.assert_allclose(sliced.mu_logp[4 * i:4 * i + 4], alone.mu_logp, rtol=1e-6)
  assert not np.array_equal(sliced.tokens, whole.tokens)  # other keys: other samples
