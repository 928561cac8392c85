"""Tests for minirl_jax.rl.rollout.score: rewards of a rollout, and the failing-reward stop."""
import functools
import importlib.util
import pathlib
import types

import numpy as np
import pytest

from minirl_jax import errors
from minirl_jax import sharding
from minirl_jax.rl import settings
from minirl_jax.rl import wiring

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
  return wiring.bind(s, sharding.make_mesh({}), _Words(), _fails_on_bad)


def test_training_steps_stop_a_failing_reward_and_evaluation_never_does():
  fns = _bound()
  eval_score = functools.partial(fns.score, count_errors=False)  # what evaluate scores with
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


@pytest.mark.parametrize("slots", [1, 3])
def test_sampler_slots_do_not_change_the_rollout(slots):
  """Two prompts x 4 samples through `rl.rollout.sample` with `sampler.slots` 1 and 3 (a
  slot's ended sequence gives way to the next) vs all 8 rows at once: the same rollout."""
  import dataclasses

  import jax

  from minirl_jax.models import transformer
  from minirl_jax.rl import rollout
  from minirl_jax.sampling import quantize
  from minirl_jax.sampling.config import SamplerConfig

  cfg = transformer.ModelConfig(vocab_size=16, num_experts=4, top_k=2)
  params = quantize.for_sampler(transformer.init_params(cfg, jax.random.key(0)),
                                SamplerConfig(dtype="float32"), transformer.param_axes(cfg))
  prompts = {"prompt_tokens": np.array([[3, 4, 5], [0, 6, 7]], np.int32),
             "prompt_mask": np.array([[1, 1, 1], [0, 1, 1]], bool)}
  scfg = SamplerConfig(dtype="float32", max_new_tokens=6, prompt_bucket=4, eos_ids=(2,))
  mesh, key = sharding.make_mesh({}), jax.random.key(3)
  got = rollout.sample(params, prompts, key, group_size=4, model_cfg=cfg, mesh=mesh,
                       sampler_cfg=dataclasses.replace(scfg, slots=slots))
  whole = rollout.sample(params, prompts, key, group_size=4, model_cfg=cfg, mesh=mesh,
                         sampler_cfg=scfg)
  assert got.tokens.shape == whole.tokens.shape == (8, 10)
  assert len(set(np.asarray(whole.num_generated))) > 1  # rows end at different steps
  for field in ("tokens", "attn_mask", "completion_mask", "routing_mu", "num_generated"):
    np.testing.assert_array_equal(getattr(got, field), getattr(whole, field), err_msg=field)
  np.testing.assert_allclose(got.mu_logp, whole.mu_logp, atol=1e-5)
  np.testing.assert_allclose(got.sample_logp, whole.sample_logp, atol=1e-5)
