"""Every program lowers for TPU and GPU before any accelerator is lent: the 30B presets'
meshes (v5p: fsdp 16 x expert 8 on 128 fake devices; h100: fsdp 8 on 8) with a scaled-down
model, each MoE kernel, replay on and off (tests/lowering_child.py). `jax.export` lowers for
a platform without its plugin; what it cannot check (Mosaic's and XLA's compile on the
device itself) is said in docs/scaling.md."""
import json
import pathlib
import subprocess
import sys

import pytest

import fake_devices
import lowering_child

TESTS = pathlib.Path(__file__).parent
PROGRAMS = ("sft_step", "rl_step", "pi_old", "prefill", "start", "decode")
DEVICES = {"v5p": 128, "h100": 8}
MODEL_PROGRAMS = ("sft_step", "rl_step", "pi_old", "prefill", "decode")  # run the MoE


@pytest.fixture(scope="module", params=sorted(DEVICES))
def lowered(request):
  preset = request.param
  out = fake_devices.run(TESTS / "lowering_child.py", preset, num_devices=DEVICES[preset])
  assert out.pop("devices") == DEVICES[preset]
  return preset, out


def test_every_program_lowers_for_tpu_and_cuda(lowered):
  preset, out = lowered
  assert sorted(out) == sorted(lowering_child.CASES)
  failed = {(case, program, platform): r["error"]
            for case, by_program in out.items() for program, by_platform in by_program.items()
            for platform, r in by_platform.items() if not r["ok"]}
  assert not failed, (preset, failed)
  for case, by_program in out.items():
    assert sorted(by_program) == sorted(PROGRAMS), case
    for by_platform in by_program.values():
      assert {"tpu", "cuda"} <= set(by_platform)


def test_megablox_is_the_pallas_kernel_on_tpu_and_ragged_dot_on_gpu(lowered):
  _, out = lowered
  for case in ("megablox", "megablox_r3"):
    for program in MODEL_PROGRAMS:
      ops = out[case][program]
      assert "ragged_dot" in ops["cuda"]["ops"], (case, program)
      assert "tpu_custom_call" not in ops["cuda"]["ops"], (case, program)
      if program in ("prefill", "decode"):  # the preset's int8 sampler: XLA's, int8 as is
        assert "ragged_dot" in ops["tpu"]["ops"], (case, program)
        continue
      assert "tpu_custom_call" in ops["tpu"]["ops"], (case, program)
      assert "ragged_dot" not in ops["tpu"]["ops"], (case, program)
  for program in MODEL_PROGRAMS:
    assert "tpu_custom_call" not in out["ragged_dot"][program]["tpu"]["ops"]
    assert "ragged_dot" in out["ragged_dot"][program]["tpu"]["ops"]


def test_expert_exchange_is_ragged_on_accelerators_and_padded_on_cpu(lowered):
  preset, out = lowered
  for case in lowering_child.CASES:
    for program in MODEL_PROGRAMS:
      for platform, r in out[case][program].items():
        ragged = "ragged_all_to_all" in r["ops"]
        if preset == "h100":  # fsdp only: no expert parallelism, no exchange
          assert not ragged and "all_to_all" not in r["ops"], (case, program, platform)
        else:
          assert ragged == (platform != "cpu"), (case, program, platform)
          assert "all_to_all" in r["ops"], (case, program, platform)


def test_lower_script_lowers_the_full_size_v5p_preset():
  """scripts/lower.py on the real 30B model and the v5p mesh (128 fake devices): a user's
  check that a config lowers for TPU, from any machine."""
  out = subprocess.run(
      [sys.executable, str(TESTS.parent / "scripts" / "lower.py"),
       f"--config={TESTS.parent / 'configs' / 'qwen3_30b_a3b_math.py'}:v5p",
       "--platforms=tpu"], cwd=TESTS, capture_output=True, text=True, timeout=900,
      check=True).stdout
  report = json.loads(out.strip().splitlines()[-1])
  assert report["ok"]
  # The preset starts from a cold-start checkpoint (no SFT program) and samples in int8.
  assert report["lowered"] == {p: {"tpu": "ok"} for p in PROGRAMS if p != "sft_step"}
  assert "'fsdp': 16, 'expert': 8" in out
