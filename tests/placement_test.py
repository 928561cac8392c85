"""rl.placement and rl.max_staleness: the smoke job on fake CPU devices, sampler and trainer
on their own devices (placement_child.py), against the colocated job on the trainer's."""
import pathlib
import subprocess
import sys

import pytest

from minirl_jax import config_base
from minirl_jax.rl import placement
from minirl_jax.rl import settings as settings_lib

import fake_devices

ROOT = pathlib.Path(__file__).parents[1]
CHILD = pathlib.Path(__file__).parent / "placement_child.py"
TIMED = ("time/", "throughput/")


def _values(records):
  return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in records]


def _same(a, b):
  """Records equal: the rollouts' numbers exactly, the updates' within float32 1e-6."""
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(_values(a), _values(b)):
    assert x.keys() == y.keys()
    for key in x:
      if key.startswith(("rollout/", "reward/")) or isinstance(x[key], str):
        assert x[key] == y[key], key
      else:
        assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  colocated = fake_devices.run(CHILD, "colocated", str(tmp_path_factory.mktemp("co")),
                               num_devices=4)
  split = fake_devices.run(CHILD, "disaggregated", str(tmp_path_factory.mktemp("dis")))
  return colocated, split


def test_disaggregated_equals_colocated(runs):
  colocated, split = runs
  assert colocated["devices"] == 4 and split["devices"] == 8
  _same(split["k0"], colocated["k0"])  # synchronous: the same run on other devices
  _same(split["k1"], colocated["k1"])  # one version behind, wherever it samples
  assert [r.get("staleness/versions") for r in split["k0"][1:]] == [0.0] * 4
  assert [r.get("staleness/versions") for r in split["k1"][1:]] == [0.0, 1.0, 1.0, 1.0]


def test_stale_rollouts_come_from_the_recorded_version(runs):
  lag = runs[1]["lag"]
  assert lag["sampler_devices"] == [0, 1, 2, 3] and lag["trainer_devices"] == [4, 5, 6, 7]
  assert lag["rollout_from_version_t_minus_2"] == {"1": True, "2": True, "3": True,
                                                   "4": True}
  assert lag["weights_identical"] and lag["weights_on_sampler"]


def test_staleness_splits_the_kl(runs):
  k1 = runs[1]["k1"]
  step1 = k1[1]  # sampled by the weights pi_old has: no staleness part
  assert step1["mismatch/kl_k3_staleness"] == 0.0
  assert step1["mismatch/kl_k3_format"] == step1["mismatch/kl_k3"]
  for r in k1[2:]:
    assert r["mismatch/kl_k3_staleness"] > 0 and r["mismatch/kl_k3_format"] > 0
  # The same step synchronous has only the format part, and a smaller total.
  k0 = runs[1]["k0"]
  assert k1[2]["mismatch/kl_k3"] > k0[2]["mismatch/kl_k3"]


def test_preempted_stale_run_resumes_exactly(runs):
  resumed = runs[1]["resumed"]
  assert resumed["stopped_at"] == 2
  # The checkpoints after SFT (global step 4) would hold nothing in flight; after RL steps
  # 1 and 2 (global 5, 6) each holds step t + 1's rollout.
  assert resumed["inflight_files"] == ["5.npz", "6.npz"]
  _same(resumed["records"], runs[1]["k1"])


@pytest.mark.parametrize("overrides,message", [
    ({"rl.placement": "disaggregated", "rl.sampler_devices": 8},
     r"rl.sampler_devices \(8\) must leave the trainer at least one of the 8 devices"),
    ({"rl.placement": "disaggregated", "sampler_mesh.data": 3},
     r"sampler_mesh: mesh .* needs 3 devices, found 4"),
    ({"rl.placement": "disaggregated", "rl.sampler_devices": 2, "mesh.fsdp": 4},
     r"mesh: 6 devices do not divide by the fixed axes"),
])
def test_bad_splits_fail_in_one_line(overrides, message):
  config = config_base.sibling(str(ROOT / "configs" / "smoke.py"), "smoke")
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(ValueError, match=message):
    placement.meshes(settings_lib.from_config(config), devices=[object()] * 8)


def test_one_device_cannot_be_split():
  config = config_base.sibling(str(ROOT / "configs" / "smoke.py"), "smoke")
  config.rl.placement = "disaggregated"
  with pytest.raises(ValueError, match="needs at least 2 devices .* found 1"):
    placement.meshes(settings_lib.from_config(config), devices=[object()])
  config.rl.placement = "colocated"
  config.rl.sampler_devices = 2
  with pytest.raises(ValueError, match=r"rl.sampler_devices \(2\) is only read with "
                     "rl.placement=disaggregated"):
    settings_lib.from_config(config)


def test_train_refuses_a_split_beyond_the_devices_in_one_line(tmp_path):
  run = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "train.py"),
       f"--config={ROOT / 'configs' / 'smoke.py'}",
       "--config.rl.placement=disaggregated", f"--workdir={tmp_path}"],
      cwd=ROOT / "tests", capture_output=True, text=True, timeout=600)
  assert run.returncode == 2 and "Traceback" not in run.stderr
  lines = [line for line in run.stderr.strip().splitlines()]
  assert lines[-1].endswith("rl.placement=disaggregated needs at least 2 devices (one to "
                            "sample, one to train), found 1"), run.stderr


def test_overlap_estimate_takes_the_longer_side():
  est = placement.overlap({"sample": 3.0, "score": 0.5, "pi_old": 0.5, "train": 1.5,
                           "publish": 0.5})
  assert est["synchronous_s"] == 6.0 and est["overlapped_s"] == 3.0
  assert est["trainer_idle_s"] == 0.0 and est["sampler_idle_s"] == 0.0
  assert est["speedup"] == 2.0
  est = placement.overlap({"sample": 1.0, "score": 0.5, "pi_old": 0.5, "train": 2.0,
                           "publish": 0.0})
  assert est["overlapped_s"] == 3.0 and est["sampler_idle_s"] == 2.0
  assert est["speedup"] == pytest.approx(4.0 / 3.0)
