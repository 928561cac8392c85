"""Sharding: mesh and logical specs in-process; on 8 fake CPU devices (two child processes),
sharded forward, rl_step, checkpoint restore, sampler and a whole Run equal one device."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from minirl_jax import sharding

import fake_devices
import sharding_children

ROOT = pathlib.Path(__file__).parents[1]
CHILDREN = pathlib.Path(sharding_children.__file__)
# Every sharded result is compared with a one-device result built by the same compiler.
CHILD_XLA_FLAGS = fake_devices.XLA_FLAGS


# --- in-process: mesh sizes, logical specs, optimizer-state and batch placement -------------

@pytest.mark.parametrize("sizes,num_devices,message", [
    ({"data": 2, "pipeline": 2}, 4, r"unknown axes \['pipeline'\]"),
    ({"data": -1, "fsdp": -1}, 4, "at most one -1"),
    ({"data": 0}, 4, "must be positive"),
    ({"data": -1, "fsdp": 3}, 8, "8 devices do not divide by the fixed axes"),
    ({"data": 2, "fsdp": 2}, 8, "needs 4 devices, found 8"),
])
def test_make_mesh_errors_name_the_problem(sizes, num_devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(sizes, devices=[object()] * num_devices)


def test_make_mesh_fills_minus_one_and_defaults_to_one():
  mesh = sharding.make_mesh({"fsdp": -1})
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "expert": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_spec_keeps_only_axes_that_divide():
  mesh = AbstractMesh((2, 2, 2, 4), sharding.MESH_AXES)
  spec = lambda shape, names: sharding.logical_spec(shape, names, mesh)
  assert spec((8, 6), ("batch", "embed")) == P(("data", "fsdp", "expert"), None)
  assert spec((4, 6), ("batch", "embed")) == P(("data", "fsdp"), None)
  # 2 rows: only `data` divides; `fsdp` stays free for the embedding dim.
  assert spec((2, 6), ("batch", "embed")) == P("data", "fsdp")
  assert spec((3, 6), ("batch", "embed")) == P(None, "fsdp")
  assert spec((4, 7, 6), ("expert", "embed", "mlp")) == P("expert", None, None)
  assert spec((4, 8, 8), ("expert", "embed", "mlp")) == P("expert", "fsdp", "tensor")
  assert spec((2, 8), ("layers", "norm")) == P(None, None)
  one = AbstractMesh((1, 1, 1, 1), sharding.MESH_AXES)  # size-1 axes never appear
  assert sharding.logical_spec((8, 8), ("batch", "embed"), one) == P(None, None)


def test_like_params_matches_moments_by_path_not_shape():
  params = {"w_gate": np.zeros((2, 3, 3)), "w_down": np.zeros((2, 3, 3)), "norm": np.ones(3)}
  param_sh = {"w_gate": "G", "w_down": "D", "norm": "N"}
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  mesh = sharding.make_mesh({})
  got = sharding.like_params(opt_state, params, param_sh, mesh)
  for moment in ("mu", "nu"):
    assert optax.tree_utils.tree_get(got, moment) == param_sh
  assert optax.tree_utils.tree_get(got, "count") == sharding.replicated(mesh)


def test_shard_batch_places_every_leaf_and_keeps_values():
  mesh = sharding.make_mesh({})
  batch = {"tokens": np.arange(6).reshape(2, 3), "count": np.float32(3), "none": None,
           "on_device": jax.numpy.ones((2, 3))}
  placed = sharding.shard_batch(batch, mesh)
  assert placed["none"] is None and placed["count"].shape == ()
  for key in ("tokens", "count", "on_device"):
    assert placed[key].sharding.mesh == mesh, key
    np.testing.assert_array_equal(placed[key], batch[key])


# --- 8 fake CPU devices, in child processes ------------------------------------------------

class _Children:
  """Starts both child programs at once (their compiles overlap); results on demand."""

  NAMES = ("equivalence", "run")

  def __init__(self, tmp):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": CHILD_XLA_FLAGS}
    self._tmp, self._procs, self._results = tmp, {}, {}
    for name in self.NAMES:
      # `-c` (not a script path): spawned reward workers do not re-import this file.
      code = ("import importlib.util as u"
              f"; s = u.spec_from_file_location('child', {str(CHILDREN)!r})"
              f"; m = u.module_from_spec(s); s.loader.exec_module(m)"
              f"; m.child_main({name!r}, {str(tmp / name)!r})")
      with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
        self._procs[name] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                             stdout=out, stderr=err)

  def result(self, name):
    """(JSON the child printed, its per-check errors)."""
    if name not in self._results:
      returncode = self._procs[name].wait(timeout=600)
      stderr = (self._tmp / f"{name}.err").read_text()
      assert returncode == 0, stderr[-3000:]
      lines = (self._tmp / f"{name}.out").read_text().strip().splitlines()
      self._results[name] = json.loads(lines[-1])
    return self._results[name], self._results[name].get("errors", {})

  def close(self):
    for proc in self._procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def children(tmp_path_factory):
  procs = _Children(tmp_path_factory.mktemp("sharding"))
  yield procs
  procs.close()


def _ok(errors, *sections):
  for section in ("child", *sections):
    assert section not in errors, errors[section]


def test_mesh_of_eight_devices(children):
  out, errors = children.result("equivalence")
  _ok(errors, "mesh")
  assert out["mesh_fill"] == {"data": 4, "fsdp": 2, "expert": 1, "tensor": 1}


def test_params_and_batch_are_really_sharded(children):
  out, errors = children.result("equivalence")
  _ok(errors, "forward")
  a, b = out["forward"]["a"], out["forward"]["b"]
  assert a["specs"]["moe/w_gate"] == [None, "expert", "fsdp", None]
  assert a["specs"]["moe/w_down"] == [None, "expert", None, "fsdp"]
  assert a["specs"]["mlp/w_up"] == [None, "fsdp", None]
  assert a["w_gate_shard_shape"] == [1, 4 // 2, 32 // 2, 32]  # of [L, E, D, F] = [1, 4, 32, 32]
  assert a["batch_spec"] == [["data", "fsdp", "expert"], None]
  assert a["routing_spec"] == [None, ["data", "fsdp", "expert"], None, None]
  # tensor=4 splits 4 query heads and the FFNs; 2 kv heads do not divide, so replicated.
  assert b["specs"]["moe/w_gate"] == [None, None, "fsdp", "tensor"]
  assert b["specs"]["attn/wq"] == [None, "fsdp", "tensor", None]
  assert b["specs"]["attn/wk"] == [None, "fsdp", None, None]
  assert b["specs"]["lm_head"] == ["fsdp", "tensor"]
  assert b["batch_spec"] == ["fsdp", None]


def test_sharded_forward_equals_one_device(children):
  out, errors = children.result("equivalence")
  _ok(errors, "forward")
  for mesh in ("a", "b"):
    got = out["forward"][mesh]
    assert got["logits_err"] < 1e-5, (mesh, got["logits_err"])
    assert got["routing_equal"] and got["router_probs_err"] < 1e-6, mesh


def test_sharded_rl_step_equals_one_device(children):
  out, errors = children.result("equivalence")
  _ok(errors, "rl_step")
  rl = out["rl_step"]
  assert rl["moved"] > 1e-3  # the step really updates, so the comparison means something
  assert rl["params_err"] < 1e-6 and rl["opt_err"] < 1e-6, rl
  assert rl["metrics_err"] < 1e-5, rl
  assert rl["moments_like_params"] and rl["out_w_gate_spec"] == [None, "expert", "fsdp", None]


def test_checkpoint_restores_onto_another_mesh_and_resumes(children):
  out, errors = children.result("equivalence")
  _ok(errors, "rl_step", "checkpoint")
  ckpt = out["checkpoint"]
  assert ckpt["restored_equal"]
  assert ckpt["restored_w_gate_spec"] == [None, None, "fsdp", "tensor"]
  assert ckpt["moments_like_params"]
  assert ckpt["params_err"] < 1e-6 and ckpt["metrics_err"] < 1e-5, ckpt


def test_run_on_a_mesh_completes(children):
  out, errors = children.result("run")
  _ok(errors, "run")
  run = out["run"]
  assert run["sft_steps"] == 2 and run["rl_steps"] == 1
  assert run["rl_metrics_finite"] and run["w_gate_spec"] == [None, "expert", "fsdp", None]
  assert run["moments_like_params"]


def test_run_rejects_eval_batches_the_mesh_cannot_split(children):
  out, errors = children.result("run")
  _ok(errors, "eval_size")
  assert "multiple of the data-parallel size (8" in out["eval_size_error"]


def test_sampler_on_a_mesh_shards_the_cache_and_matches_one_device(children):
  out, errors = children.result("run")
  _ok(errors, "run", "sampler")
  samp = out["sampler"]
  assert samp["cache_spec"][0] == ["data", "fsdp", "expert"]  # the slots: batch-sharded
  assert samp["rows_spec"][0] == ["data", "fsdp", "expert"]  # the rollout's rows too
  assert samp["tokens_equal"] and samp["routing_equal"] and samp["mu_logp_err"] < 1e-5, samp
  assert samp["few_prompts_equal"] and samp["few_prompts_mu_logp_err"] < 1e-5, samp


# --- the child programs ----------------------------------------------------------------------
