"""On 8 fake CPU devices (run by expert_parallel_test.py): the expert-parallel MoE layer vs
one device, for meshes with expert = 2, 4, 8. Prints one JSON line."""
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
  return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) / max(1.0, float(np.max(np.abs(w))))
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
  # 6 experts do not split 4 ways: the layer runs whole on each device.
  with jax.set_mesh(sharding.make_mesh({"data": 2, "expert": 4})):
    out["inactive_when_not_dividing"] = expert_parallel.active_mesh(6) is None
  print(json.dumps(out))


if __name__ == "__main__":
  main()
