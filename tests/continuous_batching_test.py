"""The decode slots: a slot whose sequence ended takes the next waiting one, and the
rollout does not depend on how many slots there are, the order they take sequences in, or
whether a prompt's G samples share one prefill."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minirl_jax.sampling import sampler
from minirl_jax.sampling.config import SamplerConfig

import sampling_test

CFG = sampling_test.CFG  # tiny: vocab 32, 2 MoE layers of 4 experts, top-2
SAMPLE = SamplerConfig(max_new_tokens=10, eos_ids=(1, 2, 3), pad_id=0, prompt_bucket=8)
LENGTHS = np.array([6, 3, 5, 1])
N, G, P0 = len(LENGTHS), 3, 6  # 4 prompts x 3 samples = 12 sequences
M = N * G
EXACT = ("tokens", "attn_mask", "completion_mask", "routing_mu", "num_generated")


@pytest.fixture(scope="module")
def params():
  return sampling_test.tiny_params()


@pytest.fixture(scope="module")
def prompts():
  return sampling_test.left_padded_prompts(LENGTHS, P0)


def _run(params, prompts, lengths=LENGTHS, group_size=G, slots=0, order=None):
  """(Rollout, decode steps run) with `sampler.slots` = `slots`."""
  scfg = dataclasses.replace(SAMPLE, slots=slots)
  kw = dict(model_cfg=CFG, sampler_cfg=scfg, group_size=group_size)
  tokens, mask = sampler.bucket_prompts(prompts, lengths, scfg)
  prefix, first = sampler.prefill_jit(params, tokens, mask, jax.random.key(2), **kw)
  slots = sampler.num_slots(scfg, first.tokens.shape[0])
  state = sampler.start_jit(prefix, first, slots=slots, shards=1, order=order, **kw)
  state = sampler.decode_jit(params, state, prefix, **kw)
  return state.rollout, int(state.step)


@pytest.fixture(scope="module")
def everyone(params, prompts):
  """Every sequence in its own slot: today's static batch."""
  return _run(params, prompts)


def _assert_same(got, want, atol=1e-5):
  for field in EXACT:
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  np.testing.assert_allclose(got.mu_logp, want.mu_logp, atol=atol)
  np.testing.assert_allclose(got.sample_logp, want.sample_logp, atol=atol)


def test_the_fixture_has_ragged_lengths(everyone):
  """The tests below would prove nothing if every sequence ended at the same step."""
  rollout, steps = everyone
  generated = np.asarray(rollout.num_generated)
  assert generated.min() < generated.max() == SAMPLE.max_new_tokens
  assert steps == generated.max() - 1  # the static batch waits for its longest row


@pytest.mark.parametrize("slots", [1, 3, M])
def test_slots_do_not_change_the_rollout(params, prompts, everyone, slots):
  rollout, _ = _run(params, prompts, slots=slots)
  _assert_same(rollout, everyone[0])


def test_one_slot_never_decodes_for_an_ended_sequence(params, prompts):
  """With one slot, every decode step samples a real token: the steps are exactly the
  tokens after each sequence's first (which prefill sampled)."""
  rollout, steps = _run(params, prompts, slots=1)
  assert steps == int(np.sum(np.asarray(rollout.num_generated) - 1))


def test_three_slots_stay_busy_until_the_queue_is_empty(params, prompts):
  rollout, steps = _run(params, prompts, slots=3)
  work = int(np.sum(np.asarray(rollout.num_generated) - 1))
  # busy slots: 3 per step while any sequence waits, so at most the last 3 drain alone
  assert -(-work // 3) <= steps <= -(-work // 3) + SAMPLE.max_new_tokens


@pytest.mark.parametrize("slots", [1, 5])
def test_the_order_slots_take_sequences_in_does_not_matter(params, prompts, slots):
  order = jnp.asarray(np.random.default_rng(0).permutation(M), jnp.int32)
  rollout, _ = _run(params, prompts, slots=slots, order=order)
  want, _ = _run(params, prompts, slots=slots)
  _assert_same(rollout, want)


@pytest.mark.parametrize("slots", [0, 4])
def test_one_prefill_per_group_equals_a_prefill_per_sample(params, prompts, everyone, slots):
  """Each prompt prefilled once for its G samples vs repeated G times (group size 1)."""
  repeated, _ = _run(params, jnp.repeat(prompts, G, axis=0), np.repeat(LENGTHS, G),
                     group_size=1, slots=slots)
  _assert_same(repeated, everyone[0])


def test_sequence_keys_follow_the_sequence_index(params, prompts, everyone):
  """Sequence j draws with fold_in(rng, j): the first 3 prompts' rollout is the first 9
  rows of the 4 prompts' one."""
  part, _ = _run(params, prompts[:3], LENGTHS[:3])
  whole = everyone[0]
  for field in ("tokens", "completion_mask", "num_generated"):
    np.testing.assert_array_equal(getattr(part, field), getattr(whole, field)[:9],
                                  err_msg=field)
  np.testing.assert_array_equal(part.routing_mu, whole.routing_mu[:, :9])


@pytest.mark.parametrize("wanted,sequences,shards,slots", [
    (0, 16, 1, 16), (0, 16, 4, 16), (100, 16, 1, 16), (5, 16, 4, 4), (2, 16, 4, 4),
    (6, 12, 2, 6), (7, 12, 2, 6)])
def test_num_slots(wanted, sequences, shards, slots):
  """`sampler.slots` (0: every sequence), at most the sequences, a multiple of the shards."""
  cfg = dataclasses.replace(SAMPLE, slots=wanted)
  assert sampler.num_slots(cfg, sequences, shards) == slots


def test_limits_cut_each_sequence_where_it_says(params, prompts, everyone):
  """Per-sequence budgets (the benchmark's length distributions): each sequence stops at
  its limit or its EOS, whichever comes first, and its tokens up to there are unchanged."""
  limits = np.random.default_rng(1).integers(1, SAMPLE.max_new_tokens + 1, M)
  scfg = dataclasses.replace(SAMPLE, slots=5)
  got = sampler.generate(params, prompts, LENGTHS, jax.random.key(2), model_cfg=CFG,
                         sampler_cfg=scfg, group_size=G, limits=jnp.asarray(limits))
  want = everyone[0]
  generated = np.minimum(limits, np.asarray(want.num_generated))
  np.testing.assert_array_equal(got.num_generated, generated)
  np.testing.assert_array_equal(np.asarray(got.completion_mask).sum(1), generated)
  kept = np.asarray(got.completion_mask) > 0
  np.testing.assert_array_equal(np.asarray(got.tokens)[kept], np.asarray(want.tokens)[kept])
