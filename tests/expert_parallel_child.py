"""On 8 fake CPU devices (run by expert_parallel_test.py): the expert-parallel MoE layer vs
one device, for meshes with expert = 2, 4, 8; and the exchange that accelerators run
(`ragged_all_to_all`, which XLA:CPU lacks) through an emulation of the collective's
documented semantics. Prints one JSON line."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import sharding
from minirl_jax.models import expert_parallel
from minirl_jax.models import moe
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig


def _rel_err(got, want):
  return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
             / max(1.0, float(np.max(np.abs(w))))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _layer(cfg):
  params = transformer.init_params(cfg, jax.random.key(0))
  return jax.tree.map(lambda w: w[0], params["moe"])


def _loss_and_grads(cfg):
  def loss(p, x, replay):
    y, routing = moe.moe_ffn(p, x, cfg, valid_BT=jnp.ones(x.shape[:2], bool), replay_BTk=replay)
    return jnp.sum(jnp.sin(y)), (y, routing.ids_BTk)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _placed(p, x, replay, mesh, cfg):
  axes = transformer.param_axes(cfg)["moe"]
  specs = jax.tree.map(lambda w, names: sharding.logical_spec(w.shape, names[1:], mesh), p, axes,
                       is_leaf=lambda t: isinstance(t, tuple))
  p = jax.tree.map(lambda w, s: jax.device_put(w, jax.sharding.NamedSharding(mesh, s)), p, specs)
  return p, jax.device_put(x, sharding.batch_sharding(mesh, 3)), jax.device_put(
      replay, sharding.batch_sharding(mesh, 3))


def _distinct_replay(key, shape, num_experts):
  ids = jax.random.randint(key, shape, 0, num_experts)
  first, second = ids[..., :1], ids[..., 1:]
  return jnp.concatenate([first, jnp.where(second == first, (second + 1) % num_experts, second)],
                         axis=-1).astype(jnp.int8)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` as its docstring defines it, from all_gather: sender p's
  rows [input_offsets[p][j], + send_sizes[p][j]) land in peer j's output at
  output_offsets[p][j]. A receiver whose recv_sizes disagree with what is sent gets
  poisoned rows (NaN, or -1 ids), so a wrong size fails the comparison."""
  gathered = jax.lax.all_gather((operand, input_offsets, send_sizes, output_offsets),
                                axis_name)
  ops, starts, sizes, ats = gathered
  me = jax.lax.axis_index(axis_name)
  rows = jnp.arange(output.shape[0])
  poison = jnp.nan if jnp.issubdtype(output.dtype, jnp.floating) else -1
  for p in range(ops.shape[0]):
    start, size, at = starts[p, me], sizes[p, me], ats[p, me]
    inside = (rows >= at) & (rows < at + size)
    src = jnp.clip(start + rows - at, 0, operand.shape[0] - 1)
    value = jnp.where(recv_sizes[p] == size, ops[p][src], poison)
    output = jnp.where(inside.reshape(-1, *([1] * (output.ndim - 1))), value, output)
  return output


def _ragged_exchange_cases(p, cfg):
  """The ragged exchange (emulated collective) against the padded one XLA:CPU runs, values
  and gradients, at several expert-axis sizes and round counts."""
  local_ffn = functools.partial(moe._local_ffn, impl="blocks", max_block=cfg.moe_block_size)
  x = jax.random.normal(jax.random.key(3), (48, cfg.d_model))
  ids = _distinct_replay(jax.random.key(4), (48, cfg.top_k), cfg.num_experts).astype(jnp.int32)
  cases = []
  for ep, factor in ((2, 1.25), (4, 1.25), (8, 1.25), (8, 0.1)):
    mesh = sharding.make_mesh({"data": 8 // ep, "expert": ep})
    def loss(p, x, collective):
      y = expert_parallel.experts_ffn(x, ids, p, mesh, local_ffn=local_ffn,
                                      capacity_factor=factor, ragged_collective=collective)
      return jnp.sum(jnp.sin(y)), y
    run = lambda c: sharding.on_mesh(mesh, jax.jit(jax.value_and_grad(
        functools.partial(loss, collective=c), argnums=(0, 1), has_aux=True)))(p, x)
    (_, y_r), g_r = run(emulated_ragged_all_to_all)
    (_, y_p), g_p = run(None)  # on CPU: the padded exchange
    cases.append({"expert": ep, "capacity_factor": factor, "y_err": _rel_err(y_r, y_p),
                  "grad_err": _rel_err(g_r, g_p),
                  "finite": bool(np.isfinite(np.asarray(y_r)).all())})
  return cases


def main():
  jax.config.update("jax_default_matmul_precision", "highest")
  out = {"cases": []}
  base = ModelConfig(d_model=32, num_experts=8, top_k=2, expert_ffn_dim=16)
  p = _layer(base)
  # Training-shaped (8 rows x 6 tokens) and decode-shaped (8 rows x 1 token) batches.
  # At expert = 8 a capacity factor of 0.1 forces many all-to-all rounds.
  train_cases = ((2, 1.25), (4, 1.25), (8, 0.1))
  for (b, t), cases in (((8, 6), train_cases), ((8, 1), ((8, 1.25),))):
    x = jax.random.normal(jax.random.key(1), (b, t, base.d_model))
    replay = _distinct_replay(jax.random.key(2), (b, t, base.top_k), base.num_experts)
    live = replay.at[: b // 2].set(-1)  # half the rows route live
    want = _loss_and_grads(base)(p, x, None), _loss_and_grads(base)(p, x, live)
    for ep, factor in cases:
      cfg = ModelConfig(**{**base.__dict__, "expert_capacity_factor": factor})
      mesh = sharding.make_mesh({"data": 8 // ep, "expert": ep})
      ps, xs, ls = _placed(p, x, live, mesh, cfg)
      fn = sharding.on_mesh(mesh, _loss_and_grads(cfg))
      got = fn(ps, xs, None), fn(ps, xs, ls)
      with jax.set_mesh(mesh):
        hlo = _loss_and_grads(cfg).lower(ps, xs, None).as_text()
        active = expert_parallel.active_mesh(cfg.num_experts) is not None
      case = {"tokens": [b, t], "expert": ep, "capacity_factor": factor, "active": active,
              "all_to_all": "all_to_all" in hlo or "all-to-all" in hlo}
      for name, (g, w) in (("live", (got[0], want[0])), ("replay", (got[1], want[1]))):
        (_, (y_g, ids_g)), grads_g = g
        (_, (y_w, ids_w)), grads_w = w
        case[name] = {"y_err": _rel_err(y_g, y_w), "grad_err": _rel_err(grads_g, grads_w),
                      "ids_equal": bool(np.array_equal(ids_g, ids_w))}
      out["cases"].append(case)
  out["ragged"] = _ragged_exchange_cases(p, base)
  # 6 experts do not split 4 ways: the layer runs whole on each device.
  with jax.set_mesh(sharding.make_mesh({"data": 2, "expert": 4})):
    out["inactive_when_not_dividing"] = expert_parallel.active_mesh(6) is None
  print(json.dumps(out))


if __name__ == "__main__":
  main()
