"""On 8 fake CPU devices (run by plan_test.py): `plan.make`'s per-program bytes next to XLA's
`memory_analysis()` of the same programs compiled from abstract shapes. Prints one JSON line."""
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax import config_base
from minirl_jax import plan as plan_lib
from minirl_jax import sharding
from minirl_jax.models import linear
from minirl_jax.models import transformer
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import state as state_lib
from minirl_jax.rl import train_step
from minirl_jax.sampling import quantize as quantize_lib
from minirl_jax.sampling import sampler as sampler_lib

# Scaled-down shapes of the 30B presets: remat, chunked attention and logits, bfloat16 off
# (XLA:CPU computes bfloat16 dots in float32 buffers, which no accelerator does).
MODEL = dict(vocab_size=2048, d_model=256, num_layers=4, num_heads=8, num_kv_heads=2,
             head_dim=32, num_experts=8, top_k=2, expert_ffn_dim=256, attention_chunk=128,
             logits_chunk=128)
CASES = {
    "fsdp4_expert2_remat": dict(mesh=dict(data=1, fsdp=4, expert=2), model=dict(remat=True),
                                rl=dict(micro_batch_size=16)),
    "fsdp8_no_remat": dict(mesh=dict(data=1, fsdp=8, expert=1), model=dict(remat=False),
                           rl=dict(micro_batch_size=8)),
    # Held out: added after the terms were fitted to the cases above and a third (data=2,
    # fsdp=2, expert=2, 6 layers; dropped to keep the suite short).
    "fsdp2_expert4_held_out": dict(mesh=dict(data=1, fsdp=2, expert=4),
                                   model=dict(remat=True, num_layers=2, num_experts=16,
                                              top_k=4, expert_ffn_dim=128),
                                   rl=dict(micro_batch_size=0)),
}


def _config(case):
  config = config_base.get_base_config()
  config.model.update({**MODEL, **case["model"]})
  config.mesh.update(case["mesh"])
  config.data.max_prompt_len = 64
  config.sampler.update(max_new_tokens=448, prompt_bucket=64,
                        dtype=case.get("sampler", "int8"))
  config.rl.update(prompts_per_step=16, group_size=4, mini_batch_size=32, **case["rl"])
  return config


def _put(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _rows_sharded(tree, rows, mesh):
  """Shards each leaf on its first axis of size `rows` (the batch), else replicates."""
  def one(x):
    axis = next((i for i, n in enumerate(x.shape) if n == rows), None)
    sh = (sharding.replicated(mesh) if axis is None
          else sharding.batch_sharding(mesh, len(x.shape), axis))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  return jax.tree.map(one, tree)


def _total(compiled):
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def _measure(s, mesh):
  cfg, rl = s.model, s.rl
  axes = transformer.param_axes(cfg)
  optimizer = train_step.make_optimizer(s.rl_optim(), axes)
  shapes = jax.eval_shape(lambda: train_step.init_state(
      transformer.init_params(cfg, jax.random.key(0)), optimizer))
  state_sh = state_lib.state_shardings(cfg, mesh, shapes)
  state = _put(shapes, state_sh)
  length = 64 + 448
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  mini = _rows_sharded(batch_lib.TrainBatch(
      tokens=jax.ShapeDtypeStruct((rl.mini_batch_size, length), jnp.int32),
      attn_mask=jax.ShapeDtypeStruct((rl.mini_batch_size, length), bool),
      loss_mask=f32(rl.mini_batch_size, length), advantages=f32(rl.mini_batch_size),
      old_logp=f32(rl.mini_batch_size, length), mu_logp=f32(rl.mini_batch_size, length),
      num_sequences=f32(), num_tokens=f32()), rl.mini_batch_size, mesh)
  step = functools.partial(train_step.rl_step, model_cfg=cfg, obj_cfg=s.objective,
                           optimizer=optimizer, micro_batches=rl.micro_per_update)
  rows = rl.global_batch
  tokens = _rows_sharded(jax.ShapeDtypeStruct((rows, length), jnp.int32), rows, mesh)
  mask = _rows_sharded(jax.ShapeDtypeStruct((rows, length), bool), rows, mesh)
  old = functools.partial(train_step.old_policy, routing=None, model_cfg=cfg,
                          micro_batches=rl.micro_per_global_batch)
  stacked = dataclasses.replace(s.sampler, scan_layers=True)
  sampler_params = jax.eval_shape(lambda p: quantize_lib.for_sampler(p, stacked, axes),
                                  shapes.params)
  sampler_params = jax.tree.map(
      lambda leaf, names: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
              mesh, sharding.logical_spec(x.shape, names, mesh))), leaf),
      sampler_params, axes, is_leaf=lambda x: isinstance(x, tuple) or
      linear.is_quantized(x))
  if not s.sampler.scan_layers:
    sampler_params = _per_layer(sampler_params, mesh)
  kw = dict(model_cfg=cfg, sampler_cfg=s.sampler, group_size=rl.group_size)
  n, shards = rl.prompts_per_step, sharding.batch_size_multiple(mesh)
  slots = sampler_lib.num_slots(s.sampler, rows, shards)
  prefix, rollout = jax.eval_shape(
      functools.partial(sampler_lib.prefill, **kw), sampler_params,
      jax.ShapeDtypeStruct((n, 64), jnp.int32), jax.ShapeDtypeStruct((n, 64), bool),
      jax.random.key(0))
  decode_state = jax.eval_shape(functools.partial(sampler_lib.start, slots=slots,
                                                  shards=shards, **kw), prefix, rollout)
  prefix = _rows_sharded(prefix, n, mesh)
  decode_state = decode_state.replace(
      **{f: _rows_sharded(getattr(decode_state, f), shards, mesh)
         for f in ("seq", "pos", "queue", "waiting", "num_live")},
      cache=_rows_sharded(decode_state.cache, slots, mesh),
      rollout=_rows_sharded(decode_state.rollout, rows, mesh))
  shard_bytes = lambda tree: sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(tree))
  exact = {"params": shard_bytes(state.params),
           # Adam's moments: every array but the step counts
           "optimizer_state": shard_bytes([x for x in jax.tree.leaves(state.opt_state)
                                           if x.ndim]),
           "sampler_weights": shard_bytes(sampler_params),
           "kv_cache": shard_bytes(decode_state.cache)}
  with jax.set_mesh(mesh):
    return exact, {
        "train_step": _total(jax.jit(step, donate_argnums=0, out_shardings=(
            state_sh, sharding.replicated(mesh))).lower(state, mini).compile()),
        "pi_old": _total(jax.jit(old).lower(state.params, tokens, mask).compile()),
        "decode": _total(jax.jit(functools.partial(sampler_lib.decode, **kw),
                                 donate_argnums=1).lower(sampler_params, decode_state,
                                                         prefix).compile()),
    }


def _per_layer(stacked, mesh):
  """`transformer.unstack_layers` of sharded ShapeDtypeStructs: each layer's shape and
  spec without the leading layer axis."""
  def drop(x):
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*spec[1:])))
  return {k: tuple(jax.tree.map(drop, v) for _ in range(jax.tree.leaves(v)[0].shape[0]))
          if k in ("attn", "moe", "mlp") else v for k, v in stacked.items()}


def main():
  out = {}
  for name, case in CASES.items():
    s = settings_lib.from_config(_config(case))
    mesh = sharding.make_mesh(s.mesh)
    plan = plan_lib.make(s, jax.device_count())
    exact, xla = _measure(s, mesh)
    out[name] = {"plan": plan.programs, "xla": xla, "exact": exact,
                 "plan_parts": {k: plan.parts[k] for k in exact}}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
