"""scripts/compile.py end to end on the tiny config (XLA:TPU, a 4-chip v5p described by
libtpu): the table, the step estimate's figures in range, one JSON line; bad input one line."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from minirl_jax import config_base
from minirl_jax.rl import settings
from minirl_jax.sampling import sampler

ROOT = pathlib.Path(__file__).parents[1]


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  return subprocess.run([sys.executable, "scripts/compile.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def tiny():
  """The tiny run compiled with half the 4-chip slice sampling and half training (the
  colocated programs are compiled in aot_test): decode on the sampler's 2 chips, the update
  and pi_old (taking the rollout moved over) on the trainer's 2."""
  proc = _run("--config.rl.placement=disaggregated", "--programs=rl_step,decode,pi_old",
              "--slowest=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_it_compiles_the_programs_asked_for_and_prints_their_estimates(tiny):
  text, out = tiny
  assert sorted(out["programs"]) == ["decode", "pi_old", "rl_step"]
  assert out["topology"] == "v5p:2x2x1" and out["chip"] == "TPU v5"
  update = out["programs"]["rl_step"]
  assert update["peak"] == (update["arguments"] + update["outputs"] + update["temporaries"]
                            - update["aliased"])
  # Each op at its own roofline: at least the whole program's compute and bytes alone.
  # (a sum over ops: equal to the bytes' bound up to rounding when every op is bandwidth-bound)
  assert update["roofline_seconds"] >= max(update["flops"] / 459e12,
                                           update["bytes"] / 2.765e12) * (1 - 1e-12) > 0
  assert 0 < out["update_mfu"] < 1 and 0 < out["decode_bandwidth_utilisation"] < 1
  assert "slowest ops by the roofline" in text and "RL step estimate" in text


def test_disaggregated_compiles_each_side_on_its_own_chips(tiny):
  text, out = tiny
  assert out["mesh"]["data"] == 2 and out["sampler_mesh"]["data"] == 2
  s = settings.from_config(config_base.get_base_config())
  slots = sampler.num_slots(s.sampler, s.rl.global_batch, 2)  # the sampler's 2 chips
  assert out["decode_tokens_per_second"] == pytest.approx(
      slots / out["programs"]["decode"]["roofline_seconds"])
  est = out["overlap"]
  assert est["synchronous_s"] == pytest.approx(est["sampler_s"] + est["trainer_s"])
  assert est["overlapped_s"] == pytest.approx(max(est["sampler_s"], est["trainer_s"]))
  assert est["trainer_s"] == pytest.approx(out["programs"]["pi_old"]["roofline_seconds"]
                                           + out["update_seconds"])
  assert "disaggregated (2 sampling, 2 training)" in text


def test_a_program_that_is_not_in_the_run_is_one_line():
  proc = _run("--programs=update")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: --programs: no program 'update' in this run; its programs: ")
