"""Sharding: mesh and logical specs in-process; on 8 fake CPU devices (two child processes),
sharded forward, rl_step, checkpoint restore, sampler and a whole Run equal one device."""
import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import traceback
import types

import flax
import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from minirl_jax import batch as batch_lib
from minirl_jax import checkpoint
from minirl_jax import objectives
from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import loop
from minirl_jax.rl import train_step
from minirl_jax.sampling import sampler

ROOT = pathlib.Path(__file__).parents[1]
MESH_A = dict(data=2, fsdp=2, expert=2)
MESH_B = dict(fsdp=2, tensor=4)
# LLVM -O0: a third of the compile time. Partitioning (what is tested) is HLO-level, and
# every sharded result is compared with a one-device result built by the same compiler.
CHILD_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


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
  assert spec((8, 6), ("batch", "embed")) == P(("data", "fsdp"), None)
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
  batch = {"tokens": np.arange(6).reshape(2, 3), "routing": np.ones((1, 2, 3, 2)),
           "count": np.float32(3), "none": None, "on_device": jax.numpy.ones((2, 3))}
  placed = sharding.shard_batch(batch, mesh)
  assert placed["none"] is None and placed["count"].shape == ()
  for key in ("tokens", "routing", "count", "on_device"):
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
      code = (f"import importlib.util as u; s = u.spec_from_file_location('child', {__file__!r})"
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
  assert a["batch_spec"] == [["data", "fsdp"], None]
  assert a["routing_spec"] == [None, ["data", "fsdp"], None, None]
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
  assert "multiple of the data-parallel size (4" in out["eval_size_error"]


def test_sampler_on_a_mesh_shards_the_cache_and_matches_one_device(children):
  out, errors = children.result("run")
  _ok(errors, "run", "sampler")
  samp = out["sampler"]
  assert samp["cache_spec"][1] == ["data", "fsdp"]  # [L, B, S, G, K]: batch-sharded
  assert samp["tokens_equal"] and samp["mu_logp_err"] < 1e-5, samp


# --- the child programs ----------------------------------------------------------------------

@contextlib.contextmanager
def _section(out, name):
  """Records a failing check's traceback under `out["errors"][name]` and carries on."""
  try:
    yield
  except Exception:  # pylint: disable=broad-except
    out.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]


def _spec(x):
  return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def _max_err(a, b):
  errs = jax.tree.map(lambda x, y: float(np.max(np.abs(
      np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)), a, b)
  return max(jax.tree.leaves(errs), default=0.0)


def _metrics_err(got, want):
  """Largest difference over the metrics, relative above 1."""
  return max(abs(float(got[k]) - float(want[k])) / max(1.0, abs(float(want[k]))) for k in want)


def _moments_like_params(state):
  specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
  return all(jax.tree.map(lambda x: x.sharding.spec, optax.tree_utils.tree_get(
      state.opt_state, m)) == specs for m in ("mu", "nu"))


def _model():
  # d_model == expert_ffn_dim: w_gate and w_down share a shape but not a sharding.
  return ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, num_experts=4, top_k=2, expert_ffn_dim=32, dense_ffn_dim=64,
                     moe_layers_skip=(1,))


@functools.lru_cache
def _forward(model):
  return jax.jit(functools.partial(transformer.forward, cfg=model))


def _host_batch(model, params):
  """A numpy TrainBatch of 8 rows near the current policy, replaying half the rows."""
  rng = np.random.default_rng(0)
  b, t = 8, 12
  tokens = rng.integers(0, model.vocab_size, (b, t)).astype(np.int32)
  attn = np.arange(t)[None] >= (t - rng.integers(4, t, b))[:, None]
  loss_mask = (attn & (np.arange(t)[None] >= t - 5)).astype(np.float32)
  logits, aux = _forward(model)(params, tokens, attn_mask_BT=attn)
  old = (np.asarray(transformer.token_logp(logits, tokens))
         + 0.05 * rng.normal(size=(b, t))) * loss_mask
  routing = np.asarray(aux.routing).copy()
  routing[:, : b // 2] = -1  # these rows route live
  return batch_lib.TrainBatch(
      tokens=tokens, attn_mask=attn, loss_mask=loss_mask,
      advantages=rng.normal(size=b).astype(np.float32), old_logp=old.astype(np.float32),
      mu_logp=(old + 0.05 * rng.normal(size=(b, t)) * loss_mask).astype(np.float32),
      num_sequences=np.float32(b), num_tokens=np.float32(loss_mask.sum()), routing=routing)


def _check_forward(model, params, host, out):
  ref_logits, ref_aux = _forward(model)(params, host.tokens, attn_mask_BT=host.attn_mask)
  out["forward"] = {}
  for name, sizes in (("a", MESH_A), ("b", MESH_B)):
    mesh = sharding.make_mesh(sizes)
    placed = jax.device_put(params, sharding.tree_shardings(
        params, transformer.param_axes(model), mesh))
    batch = sharding.shard_batch(host, mesh)
    logits, aux = _forward(model)(placed, batch.tokens, attn_mask_BT=batch.attn_mask)
    out["forward"][name] = dict(
        specs={"/".join(k): _spec(v)
               for k, v in flax.traverse_util.flatten_dict(placed).items()},
        batch_spec=_spec(batch.tokens), routing_spec=_spec(batch.routing),
        w_gate_shard_shape=list(placed["moe"]["w_gate"].addressable_shards[0].data.shape),
        logits_err=_max_err(logits, ref_logits),
        routing_equal=bool(np.array_equal(aux.routing, ref_aux.routing)),
        router_probs_err=_max_err(aux.router_probs, ref_aux.router_probs))


def _check_rl_step_and_checkpoint(model, params, host, workdir, out):
  """One rl_step on mesh A; checkpoint; restore onto mesh B; a second step there."""
  # eps = 1: the first Adam steps are ~lr * grad, so the gradients' scale (their global
  # normalisation) shows in the params instead of cancelling out as lr * sign(grad).
  optimizer = train_step.make_optimizer(train_step.OptimConfig(learning_rate=0.1, eps=1.0))
  step = functools.partial(train_step.rl_step, model_cfg=model,
                           obj_cfg=objectives.ObjectiveConfig(name="minirl"),
                           optimizer=optimizer)
  # A second batch: other advantages, every row routing live (same pytree: no recompile).
  host2 = host.replace(advantages=-host.advantages[::-1],
                       routing=np.full_like(host.routing, -1))
  state0 = train_step.init_state(params, optimizer)
  ref1, ref_m1 = jax.jit(step)(state0, host)
  ref2, ref_m2 = jax.jit(step)(ref1, host2)

  settings = types.SimpleNamespace(model=model)  # all `state_shardings` reads
  abstract = jax.eval_shape(lambda: state0)
  with _section(out, "rl_step"):
    mesh = sharding.make_mesh(MESH_A)
    sh_a = loop.state_shardings(settings, mesh, abstract)
    step_a = jax.jit(step, out_shardings=(sh_a, sharding.replicated(mesh)))
    new_a, m_a = step_a(jax.device_put(state0, sh_a), sharding.shard_batch(host, mesh))
    out["rl_step"] = dict(
        moved=_max_err(ref1.params, params), params_err=_max_err(new_a.params, ref1.params),
        opt_err=_max_err(new_a.opt_state, ref1.opt_state),
        metrics_err=_metrics_err(m_a, ref_m1), moments_like_params=_moments_like_params(new_a),
        out_w_gate_spec=_spec(new_a.params["moe"]["w_gate"]))
  with _section(out, "checkpoint"):
    directory = os.path.join(workdir, "state")
    checkpoint.save_params(directory, new_a)
    mesh = sharding.make_mesh(MESH_B)
    sh_b = loop.state_shardings(settings, mesh, abstract)
    restored = checkpoint.restore_params(directory, checkpoint.abstract_like(abstract, sh_b))
    step_b = jax.jit(step, out_shardings=(sh_b, sharding.replicated(mesh)))
    new_b, m_b = step_b(restored, sharding.shard_batch(host2, mesh))
    out["checkpoint"] = dict(
        restored_equal=_max_err(restored, new_a) == 0.0,
        restored_w_gate_spec=_spec(restored.params["moe"]["w_gate"]),
        moments_like_params=_moments_like_params(restored),
        params_err=_max_err(new_b.params, ref2.params), metrics_err=_metrics_err(m_b, ref_m2))


def _child_equivalence(workdir, out):
  with _section(out, "mesh"):
    out["mesh_fill"] = dict(sharding.make_mesh({"fsdp": 2, "data": -1}).shape)
  model = _model()
  params = jax.jit(transformer.init_params, static_argnums=0)(model, jax.random.key(0))
  host = _host_batch(model, params)
  with _section(out, "forward"):
    _check_forward(model, params, host, out)
  _check_rl_step_and_checkpoint(model, params, host, workdir, out)


def _smoke_config():
  spec = importlib.util.spec_from_file_location("smoke", ROOT / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.mesh = dict(MESH_A, tensor=1)
  config.rl.steps = 1  # 4 prompts x 4 = 16 rows in mini-batches of 8: divisible by 2 x 2
  config.sft.update(max_steps=2, eval_every=2)
  config.log.update(progress=False, plots=False)
  return config


def _check_sampler(run, out):
  """The run's sampler params on the mesh with batch-sharded prompts vs on one device."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 15, (16, 8)).astype(np.int32)
  lengths = rng.integers(3, 9, 16)
  kw = dict(model_cfg=run.s.model, sampler_cfg=run.s.sampler)
  params = run.engines.quantize(run.state.params)
  placed = sharding.shard_batch((tokens, lengths), run.mesh)
  state = sampler.prefill_jit(params, *sampler.bucket_prompts(*placed, run.s.sampler),
                              jax.random.key(7), **kw)
  cache_spec = _spec(state.cache.k_LBSGK)
  got = sampler.to_rollout(sampler.decode_jit(params, state, **kw))
  one_device = jax.device_put(params, jax.devices()[0])
  want = sampler.generate(one_device, tokens, lengths, jax.random.key(7), **kw)
  out["sampler"] = dict(cache_spec=cache_spec,
                        tokens_equal=bool(np.array_equal(got.tokens, want.tokens)),
                        mu_logp_err=_max_err(got.mu_logp, want.mu_logp))


def _child_run(workdir, out):
  with _section(out, "eval_size"):
    config = _smoke_config()
    config.data.eval_size = 10  # evaluation batches of 10 rows do not split 4 ways
    with pytest.raises(ValueError, match="data.eval_size") as error:
      loop.Run(config, workdir + "_bad_eval_size")
    out["eval_size_error"] = str(error.value)
  with _section(out, "run"):
    run = loop.Run(_smoke_config(), workdir)
    summary = run.run()
    with open(summary["metrics"]) as f:
      rl = [r for r in map(json.loads, f) if r["stage"] == "rl" and r["step"] == 1]
    out["run"] = dict(
        sft_steps=summary["sft_steps"], rl_steps=summary["rl_steps"],
        rl_metrics_finite=bool(rl) and all(np.isfinite(v) for v in rl[0].values()
                                           if isinstance(v, float)),
        w_gate_spec=_spec(run.state.params["moe"]["w_gate"]),
        moments_like_params=_moments_like_params(run.state))
  with _section(out, "sampler"):
    _check_sampler(run, out)


def child_main(name, workdir):
  """Runs one child program's checks and prints their results as one JSON line."""
  jax.config.update("jax_default_matmul_precision", "highest")
  os.makedirs(workdir, exist_ok=True)
  out = {}
  with _section(out, "child"):
    {"equivalence": _child_equivalence, "run": _child_run}[name](workdir, out)
  print(json.dumps(out))
