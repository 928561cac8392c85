"""The programs `sharding_test.py` runs on 8 fake CPU devices, one child process each: their
checks compare the sharded computation with one device and print one JSON line."""
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import traceback

import flax
import jax
import numpy as np
import optax
import pytest

from minirl_jax import batch as batch_lib
from minirl_jax import objectives
from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl import loop
from minirl_jax.rl import rollout as rollout_lib
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import checkpointing
from minirl_jax.rl import step as step_lib
from minirl_jax.rl import train_state
from minirl_jax.sampling import sampler

ROOT = pathlib.Path(__file__).parents[1]
MESH_A = dict(data=2, fsdp=2, expert=2)
MESH_B = dict(fsdp=2, tensor=4)


@contextlib.contextmanager
def _section(out, name):
  """Records a failing check's traceback under `out["errors"][name]` and carries on."""
  try:
    yield
  except Exception:
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
    logits, aux = sharding.on_mesh(mesh, _forward(model))(placed, batch.tokens,
                                                          attn_mask_BT=batch.attn_mask)
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
  optimizer = train_state.make_optimizer(settings_lib.OptimConfig(learning_rate=0.1, eps=1.0),
                                         transformer.param_axes(model))
  step = functools.partial(step_lib.rl_step, model_cfg=model,
                           obj_cfg=objectives.ObjectiveConfig(name="minirl"),
                           optimizer=optimizer)
  # A second batch: other advantages, every row routing live (same pytree: no recompile).
  host2 = host.replace(advantages=-host.advantages[::-1],
                       routing=np.full_like(host.routing, -1))
  state0 = train_state.init_state(params, optimizer)
  ref1, ref_m1 = jax.jit(step)(state0, host)
  ref2, ref_m2 = jax.jit(step)(ref1, host2)

  abstract = jax.eval_shape(lambda: state0)
  with _section(out, "rl_step"):
    mesh = sharding.make_mesh(MESH_A)
    sh_a = train_state.state_shardings(model, mesh, abstract)
    step_a = sharding.on_mesh(mesh, jax.jit(step, out_shardings=(sh_a,
                                                                 sharding.replicated(mesh))))
    new_a, m_a = step_a(jax.device_put(state0, sh_a), sharding.shard_batch(host, mesh))
    out["rl_step"] = dict(
        moved=_max_err(ref1.params, params), params_err=_max_err(new_a.params, ref1.params),
        opt_err=_max_err(new_a.opt_state, ref1.opt_state),
        metrics_err=_metrics_err(m_a, ref_m1), moments_like_params=_moments_like_params(new_a),
        out_w_gate_spec=_spec(new_a.params["moe"]["w_gate"]))
  with _section(out, "checkpoint"):
    directory = os.path.join(workdir, "state")
    checkpointing.save_params(directory, new_a)
    mesh = sharding.make_mesh(MESH_B)
    sh_b = train_state.state_shardings(model, mesh, abstract)
    restored = checkpointing.restore_params(directory, checkpointing.abstract_like(abstract, sh_b))
    step_b = sharding.on_mesh(mesh, jax.jit(step, out_shardings=(sh_b,
                                                                 sharding.replicated(mesh))))
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
  config.rl.steps = 1  # 4 prompts x 4 = 16 rows in mini-batches of 8: divisible by 2 x 2 x 2
  config.sft.update(max_steps=2, eval_every=2)
  config.log.update(progress=False, plots=False)
  return config


def _check_sampler(run, out):
  """The run's sampler on the mesh (batch-sharded prompts, every shard scheduling its own
  slots) vs on one device (one queue): the same rollout."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 15, (8, 8)).astype(np.int32)
  lengths = rng.integers(3, 9, 8)
  scfg = dataclasses.replace(run.s.sampler, slots=16)  # 2 per shard for 8 x 2 sequences
  kw = dict(model_cfg=run.s.model, sampler_cfg=scfg, group_size=2)
  params = run.fns.quantize(run.state.params)
  placed = sharding.shard_batch((tokens, lengths), run.mesh)
  prefill, start = (sharding.on_mesh(run.mesh, f) for f in (sampler.prefill_jit,
                                                            sampler.start_jit))
  prefix, first = prefill(params, *sampler.bucket_prompts(*placed, scfg), jax.random.key(7),
                          **kw)
  slots = start(prefix, first, slots=16, shards=sharding.batch_size_multiple(run.mesh), **kw)
  cache_spec = _spec(slots.cache.k_LBSGK[0])  # per layer: [S, P + n - 1, G, K]
  got = sharding.on_mesh(run.mesh, sampler.generate)(
      params, *placed, jax.random.key(7), shards=sharding.batch_size_multiple(run.mesh), **kw)
  one_device = jax.device_put(params, jax.devices()[0])
  want = sampler.generate(one_device, tokens, lengths, jax.random.key(7), **kw)
  # 4 prompts do not split over 8 shards: `rollout.sample` prefills each response alone.
  prompts = dict(prompt_tokens=tokens[:4], prompt_mask=np.arange(8) >= 8 - lengths[:4, None])
  few = rollout_lib.sample(params, prompts, jax.random.key(7), group_size=4,
                           model_cfg=run.s.model, sampler_cfg=scfg, mesh=run.mesh)
  few_want = sampler.generate(one_device, tokens[:4], lengths[:4], jax.random.key(7),
                              **dict(kw, group_size=4))
  out["sampler"] = dict(cache_spec=cache_spec, rows_spec=_spec(got.tokens),
                        tokens_equal=bool(np.array_equal(got.tokens, want.tokens)),
                        routing_equal=bool(np.array_equal(got.routing_mu, want.routing_mu)),
                        mu_logp_err=_max_err(got.mu_logp, want.mu_logp),
                        few_prompts_equal=bool(np.array_equal(few.tokens, few_want.tokens)
                                               and np.array_equal(few.routing_mu,
                                                                  few_want.routing_mu)),
                        few_prompts_mu_logp_err=_max_err(few.mu_logp, few_want.mu_logp))


def _child_run(workdir, out):
  with _section(out, "eval_size"):
    config = _smoke_config()
    config.data.eval_size = 10  # evaluation batches of 10 rows do not split 8 ways
    with pytest.raises(ValueError, match="data.eval_size") as error:
      loop.Run(settings_lib.from_config(config), workdir + "_bad_eval_size")
    out["eval_size_error"] = str(error.value)
  with _section(out, "run"):
    run = loop.Run(settings_lib.from_config(_smoke_config()), workdir)
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
