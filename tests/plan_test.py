"""The memory plan (minirl_jax/plan.py) against XLA: on 8 fake CPU devices, each program's
planned bytes are within 25% of `compiled.memory_analysis()`, and the parts it reads off
shapes (params, optimizer state, sampler weights, KV cache) are exact."""
import pathlib

import pytest

import fake_devices

TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def measured():
  return fake_devices.run(TESTS / "plan_child.py")


def test_each_program_is_within_25_percent_of_xla(measured):
  assert len(measured) == 4
  for case, r in measured.items():
    for program in ("train_step", "pi_old", "decode"):
      ratio = r["plan"][program] / r["xla"][program]
      assert 0.75 <= ratio <= 1.25, (case, program, ratio, r)


def test_state_weights_and_cache_are_exact(measured):
  for case, r in measured.items():
    assert r["plan_parts"] == r["exact"], case
