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
  assert len(measured) == 3
  for case, r in measured.items():
    for program in ("train_step", "pi_old", "decode"):
      ratio = r["plan"][program] / r["xla"][program]
      assert 0.75 <= ratio <= 1.25, (case, program, ratio, r)


def test_state_weights_and_cache_are_exact(measured):
  for case, r in measured.items():
    assert r["plan_parts"] == r["exact"], case


@pytest.mark.parametrize("preset", ["v5p", "h100"])
def test_the_30b_presets_fit_by_the_plan(preset):
  import json
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, "scripts/plan.py", f"--config=configs/qwen3_30b_a3b_math.py:{preset}"],
      cwd=TESTS.parent, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["fits"] is True, proc.stdout
  peaks = [v for k, v in out["per_device_bytes"].items() if k.startswith("peak_")]
  assert len(peaks) == 3 and max(peaks) <= 0.9 * out["device_bytes"]
  # 128 chips of a v5p-256 slice / 8 GPUs split the 30B params (61 GB in bfloat16).
  devices = {"v5p": 128, "h100": 8}[preset]
  assert out["per_device_bytes"]["params"] * devices >= 61e9


def test_the_paper_length_does_not_fit_eight_h100s():
  """What the plan is for: the 32k-token budget of the paper needs more than 8 GPUs."""
  import json
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, "scripts/plan.py", "--config=configs/qwen3_30b_a3b_math.py:h100",
       "--config.sampler.max_new_tokens=32768"],
      cwd=TESTS.parent, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["fits"] is False


def test_on_tpu_the_decode_loop_holds_the_sampler_weights_gathered_over_fsdp():
  """XLA:TPU hoists the loop-invariant all-gather out of the decode loop (docs/scaling.md);
  the plan adds that copy for TPU only."""
  from minirl_jax import config_base
  from minirl_jax import plan
  from minirl_jax.rl import settings
  config = config_base.get_base_config()
  config.mesh.update(data=1, fsdp=4, expert=2, tensor=1)
  s = settings.from_config(config)
  generic, tpu = plan.make(s, 8), plan.make(s, 8, "tpu")
  gathered = tpu.parts["sampler_weights"] * 3
  assert generic.parts["decode_gathered_weights"] == 0 < gathered
  assert tpu.parts["decode_gathered_weights"] == gathered
  tpu_only = gathered + tpu.parts["decode_cache_relayout"] + (
      tpu.parts["decode_activations"] - generic.parts["decode_activations"])
  assert tpu.peaks["decode"] - generic.peaks["decode"] == tpu_only
  assert tpu.programs["decode"] - generic.programs["decode"] == tpu_only
  assert tpu.peaks["train_step"] == generic.peaks["train_step"]  # the backward's buffers


def _tpu_and_generic(**model):
  from minirl_jax import config_base
  from minirl_jax import plan
  from minirl_jax.rl import settings
  config = config_base.get_base_config()
  config.model.update(model)
  config.mesh.update(data=1, fsdp=4, expert=1, tensor=1)
  s = settings.from_config(config)
  return s, plan.make(s, 4, "tpu"), plan.make(s, 4)


def test_on_tpu_a_head_dim_under_128_lanes_adds_a_lane_padded_cache_copy_to_decode():
  s, tpu, generic = _tpu_and_generic(head_dim=64)
  cache = tpu.parts["kv_cache"]
  assert tpu.parts["decode_cache_relayout"] == 2 * cache  # 64 of 128 lanes
  assert generic.parts["decode_cache_relayout"] == 0
  assert _tpu_and_generic(head_dim=128)[1].parts["decode_cache_relayout"] == 0


def test_on_tpu_a_forward_holds_one_float32_buffer_of_scores_and_the_flash_kernel_none():
  from minirl_jax import plan
  s, _, _ = _tpu_and_generic(head_dim=64, attention_chunk=128)
  shapes = dict(rows=2, length=1024, cfg=s.model, mesh=dict(data=1, fsdp=4, expert=1, tensor=1))
  xla = plan._attention_working_bytes(plan.Shapes(**shapes), 1024, backward=False)
  fused = plan._attention_working_bytes(plan.Shapes(**shapes, fused_softmax=True), 1024,
                                        backward=False)
  scores = 2 * s.model.num_heads * 128 * 1024 * 4
  assert xla - fused == scores
  flash_bytes = plan._attention_working_bytes(plan.Shapes(**shapes, flash=True), 1024,
                                              backward=True)
  per_head = 2 * 1024 * s.model.num_heads * 64 * 4  # float32 model: 4 bytes
  qkv = 2 * 1024 * (2 * s.model.num_heads + 2 * s.model.num_kv_heads) * 64 * 4
  lm = 2 * 2 * s.model.num_heads * 1024 * 128 * 4
  assert flash_bytes == 2 * (qkv + 4 * per_head + lm) + 2 * per_head
