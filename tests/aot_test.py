"""Every program compiled by XLA:TPU on this CPU host (tests/aot_child.py in its own process):
each MoE kernel, replay on and off, an expert axis; memory and work read from the compiler."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from minirl_jax import aot
from minirl_jax import errors

import aot_child

TESTS = pathlib.Path(__file__).parent
PROGRAMS = ("rl_step", "pi_old", "prefill", "start", "decode")


@pytest.fixture(scope="module")
def compiled():
  # Not fake_devices.run: its CPU-only platform and fast-compile flags are not XLA:TPU's.
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run([sys.executable, str(TESTS / "aot_child.py")], env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_program_of_every_case_compiles(compiled):
  for case in aot_child.CASES:
    sft = ("sft_step",) if case == "megablox_flash_r3" else ()
    assert sorted(p for p in compiled[case] if not p.startswith("_")) == sorted(PROGRAMS + sft)


def test_megablox_runs_its_mosaic_kernel_and_an_expert_axis_the_ragged_all_to_all(compiled):
  for program in ("sft_step", "rl_step", "pi_old"):
    assert "pallas:gmm" in compiled["megablox_flash_r3"][program]["ops"], program
  for program in ("prefill", "decode"):  # the int8 sampler runs XLA's grouped matmul
    assert "pallas:gmm" not in compiled["megablox_flash_r3"][program]["ops"], program
  # The gradient kernels where there is a gradient: megablox's and flash attention's.
  for program in ("rl_step", "sft_step"):
    ops = compiled["megablox_flash_r3"][program]["ops"]
    assert {"pallas:tgmm", "pallas:flash_attention"} <= set(ops), program
    assert [op for op in ops if op.startswith("pallas:flash_mha_bwd_d")], program
  # Flash attention runs over whole sequences; the sampler's cached attention is XLA's.
  for program in ("pi_old", "sft_step"):
    assert "pallas:flash_attention" in compiled["megablox_flash_r3"][program]["ops"]
  for program in ("prefill", "decode"):
    assert "pallas:flash_attention" not in compiled["megablox_flash_r3"][program]["ops"]
  for program in ("rl_step", "pi_old", "decode"):
    assert "ragged-all-to-all" in compiled["blocks_expert_r2"][program]["ops"], program
    assert "ragged-all-to-all" not in compiled["ragged_dot"][program]["ops"], program


def test_memory_holds_the_train_state_and_training_holds_more_than_a_forward(compiled):
  for case in aot_child.CASES:
    programs, expected = compiled[case], compiled[case]["_expected"]
    # TPU tiles pad small dims, so at least the exact bytes, and not twice them.
    assert expected["train_state_bytes"] <= programs["rl_step"]["arguments"]
    assert programs["rl_step"]["arguments"] < 2 * expected["train_state_bytes"]
    assert programs["rl_step"]["peak"] > programs["pi_old"]["peak"] > 0, case


@pytest.mark.parametrize("case", ["blocks_expert_r2", "megablox_flash_r3"])
def test_work_is_counted_with_the_layer_loop_not_once(compiled, case):
  # Every FLOP of the update is in dots or in Mosaic kernels (megablox's cost estimates,
  # flash attention's computed blocks): the count with trip counts reaches the model's
  # FLOPs; the compiler's, a loop body once (and no kernel), does not.
  rl_step = compiled[case]["rl_step"]
  update = compiled[case]["_expected"]["update_flops"]
  assert rl_step["compiler_flops"] < update <= rl_step["flops"] < 2 * update
  assert rl_step["roofline_seconds"] > 0


def test_on_v5e_the_padded_exchange_compiles_and_the_ragged_one_is_one_line(compiled):
  padded, ragged = compiled["v5e_exchanges"]["padded"], compiled["v5e_exchanges"]["ragged"]
  assert "all-to-all" in padded and "ragged-all-to-all" not in padded
  assert ragged == ("the pi_old program cannot run on this TPU v5 lite slice: XLA:TPU does not "
                    "support the ragged all-to-all on its interconnect (limited ICI routing); "
                    "set model.expert_exchange=padded")


def test_a_program_that_does_not_fit_is_one_line(compiled):
  assert re.fullmatch(r"the decode program does not fit a TPU v5 lite chip: XLA:TPU needs "
                      r"[\d,.]+ GiB of the 15\.75 GiB of HBM it has \(RESOURCE_EXHAUSTED\); "
                      r"scripts/plan\.py shows where the memory goes", compiled["oom"])


def test_the_chip_is_the_described_devices_with_their_published_peaks(compiled):
  assert compiled["chip"] == {"name": "TPU v5", "flops": 459e12, "hbm_bandwidth": 2.765e12}


def test_without_libtpu_or_published_peaks_one_line(monkeypatch):
  with pytest.raises(errors.UserError, match=r"no published peaks for 'cpu'"):
    aot.chip_of(types.SimpleNamespace(device_kind="cpu"))
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(errors.UserError, match=r"needs libtpu, which is not installed: "
                     r"pip install -e '\.\[tpu\]'"):
    aot.topology_devices("v5p:2x2x1")


ONE_CHIP_HOST = {"chips_per_host_bounds": [1, 1, 1]}


@pytest.mark.parametrize("topology,bounds", [
    ("v6e:1x1", ONE_CHIP_HOST), ("v5p:1x1x1", ONE_CHIP_HOST), ("v5p:2x2x1", {}),
    ("v5e:16x16", {}), ("v5p:4x4x8", {})])
def test_a_slice_smaller_than_a_host_is_one_host_of_its_size(topology, bounds):
  assert aot._host_bounds(topology) == bounds
