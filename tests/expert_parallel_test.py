"""Expert parallelism (models/expert_parallel.py): on 8 fake CPU devices the layer's
forward, gradients and replayed forward equal one device's for expert = 2, 4, 8, whatever the
number of all-to-all rounds; and its compiled per-device FLOPs fall with the expert axis."""
import pathlib

import pytest

import fake_devices

TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def equivalence():
  return fake_devices.run(TESTS / "expert_parallel_child.py")


def test_every_mesh_and_round_count_equals_one_device(equivalence):
  cases = equivalence["cases"]
  assert {(c["expert"], c["capacity_factor"]) for c in cases} >= {(2, 1.25), (4, 1.25),
                                                                  (8, 1.25), (8, 0.1)}
  assert any(c["tokens"] == [8, 6] and c["expert"] == 8 for c in cases)
  assert any(c["tokens"] == [8, 1] for c in cases)  # decode-shaped: the sampler's calls
  for case in cases:
    assert case["active"] and case["all_to_all"], case
    for name in ("live", "replay"):
      r = case[name]
      assert r["ids_equal"] and r["y_err"] < 1e-5 and r["grad_err"] < 1e-5, (name, case)


def test_ragged_exchange_equals_the_padded_one(equivalence):
  """The exchange TPU/GPU programs run (ragged_all_to_all, emulated here from its
  documented semantics: XLA:CPU lacks it) moves the same rows as the padded one."""
  cases = equivalence["ragged"]
  assert {(c["expert"], c["capacity_factor"]) for c in cases} == {(2, 1.25), (4, 1.25),
                                                                  (8, 1.25), (8, 0.1)}
  for case in cases:
    assert case["finite"] and case["y_err"] < 1e-6 and case["grad_err"] < 1e-6, case


def test_layer_runs_whole_when_the_expert_axis_does_not_divide_the_experts(equivalence):
  assert equivalence["inactive_when_not_dividing"]


def test_rounds_bound_covers_the_worst_case():
  from minirl_jax.models import expert_parallel
  # 10 tokens, top-2, 4 local experts: a token can send both assignments to one owner.
  assert expert_parallel.rounds_bound(10, 2, 4, slots=5) == 4
  # 1 local expert: at most one assignment per token reaches an owner.
  assert expert_parallel.rounds_bound(10, 2, 1, slots=5) == 2


def test_bench_per_device_flops_fall_with_the_expert_axis():
  out = fake_devices.run(TESTS.parent / "scripts" / "bench_moe.py", "--expert_parallel",
                         "--experts=8", "--tokens=512", "--d_model=32", "--expert_ffn_dim=32",
                         "--passes=fwd_bwd")
  ep, xla = (out["fwd_bwd_ratio_to_expert_1"][k] for k in ("expert_parallel",
                                                           "xla_partitioned"))
  assert set(ep) == {"1", "2", "4", "8"}
  # Capacity factor 1.25 over a balanced share, the rounds' recompute in the backward, and
  # fixed per-device work (block padding, sorting) that weighs more at this tiny size:
  # 0.70, 0.39, 0.23.
  for size in (2, 4, 8):
    assert ep[str(size)] < 2 / size, ep
  assert all(r > 0.9 for r in xla.values()), xla  # the partitioner alone does not split it
