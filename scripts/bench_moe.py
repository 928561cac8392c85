"""Times sparse dropless MoE dispatch against the dense all-experts reference (fwd + bwd),
or measures what expert parallelism saves per device.

  python scripts/bench_moe.py
Last line: one JSON object with `speedup_vs_dense` (blocks kernel, E=64) and per-E timings.

  python scripts/bench_moe.py --expert_parallel
The MoE layer (fwd + bwd, and fwd alone) compiled for meshes with expert = 1, 2, 4, 8 at a
fixed global batch: XLA's per-device FLOPs (cost analysis) of the expert-parallel layer and
of the same layer left to XLA's partitioner. On a CPU host it runs on 8 fake devices. Last
line: one JSON object with the FLOPs and their ratios to expert = 1.
"""
import json
import os
import sys

if "--expert_parallel" in sys.argv and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Fake host devices for the meshes; only the CPU platform reads this flag.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import errors
from minirl_jax import roofline
from minirl_jax import sharding
from minirl_jax.models import moe
from minirl_jax.models import moe_reference
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig

_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "16", "64"], "Expert counts to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (best is reported).")
_EXPERT_PARALLEL = flags.DEFINE_bool(
    "expert_parallel", False, "Per-device FLOPs of the layer for expert = 1, 2, 4, 8 instead.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_FFN = flags.DEFINE_integer("expert_ffn_dim", 512, "Expert hidden width.")
_PASSES = flags.DEFINE_multi_enum("passes", ["fwd_bwd", "fwd"], ["fwd_bwd", "fwd"],
                                  "With --expert_parallel: the programs to compile.")


def _bench(num_experts, top_k=2):
  d, f = _D_MODEL.value, _FFN.value
  keys = jax.random.split(jax.random.key(num_experts), 5)
  p = {"router": jax.random.normal(keys[0], (d, num_experts)) / d ** 0.5,
       "w_gate": jax.random.normal(keys[1], (num_experts, d, f)) / d ** 0.5,
       "w_up": jax.random.normal(keys[2], (num_experts, d, f)) / d ** 0.5,
       "w_down": jax.random.normal(keys[3], (num_experts, f, d)) / f ** 0.5}
  x = jax.random.normal(keys[4], (1, _TOKENS.value, d))
  valid = jnp.ones(x.shape[:2], bool)
  row = {}
  outputs = {}
  for name in ("blocks", "ragged_dot", "dense"):
    cfg = ModelConfig(d_model=d, num_experts=num_experts, top_k=top_k, expert_ffn_dim=f,
                      moe_impl="blocks" if name == "dense" else name)
    if name == "dense":
      ffn = lambda p, x, cfg=cfg: moe_reference.dense_moe_ffn(p, x, cfg)
    else:
      ffn = lambda p, x, cfg=cfg: moe.moe_ffn(p, x, cfg, valid_BT=valid)[0]
    step = jax.jit(jax.value_and_grad(lambda p, x, ffn=ffn: jnp.sum(ffn(p, x) ** 2)))
    outputs[name] = np.asarray(jax.jit(ffn)(p, x))
    row[name] = roofline.best_seconds(lambda: step(p, x), _REPEATS.value)
  for name in ("blocks", "ragged_dot"):
    np.testing.assert_allclose(outputs[name], outputs["dense"], rtol=2e-3, atol=2e-3)
  row["max_abs_diff_vs_dense"] = float(np.max(np.abs(outputs["blocks"] - outputs["dense"])))
  return row


def _layer_flops(cfg, ep, expert_parallel):
  """Per-device FLOPs of the compiled layer, fwd + bwd and fwd, on a mesh with expert = ep."""
  mesh = sharding.make_mesh({"expert": ep}, devices=jax.devices()[:ep])
  params = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))["moe"]
  axes = transformer.param_axes(cfg)["moe"]
  p = jax.tree.map(lambda w, names: jax.ShapeDtypeStruct(w.shape[1:], w.dtype, sharding=(
      jax.sharding.NamedSharding(mesh, sharding.logical_spec(w.shape[1:], names[1:], mesh)))),
      params, axes, is_leaf=lambda t: isinstance(t, tuple))
  rows = 8
  x = jax.ShapeDtypeStruct((rows, _TOKENS.value // rows, cfg.d_model), jnp.float32,
                           sharding=sharding.batch_sharding(mesh, 3))
  layer = lambda p, x: moe.moe_ffn(p, x, cfg, valid_BT=jnp.ones(x.shape[:2], bool))[0]
  flops = {}
  programs = {"fwd_bwd": jax.grad(lambda p, x: jnp.sum(layer(p, x) ** 2), (0, 1)),
              "fwd": layer}
  for name in _PASSES.value:
    fn = programs[name]
    lower = lambda: jax.jit(fn).lower(p, x).compile()
    if expert_parallel:
      with jax.set_mesh(mesh):
        compiled = lower()
    else:
      compiled = lower()
    flops[name] = float(compiled.cost_analysis()["flops"])
  return flops


def _expert_parallel_main():
  num_experts = max(map(int, _EXPERTS.value))
  cfg = ModelConfig(d_model=_D_MODEL.value, num_experts=num_experts, top_k=2,
                    expert_ffn_dim=_FFN.value)
  sizes = [ep for ep in (1, 2, 4, 8) if ep <= jax.device_count() and num_experts % ep == 0]
  print(f"MoE layer, {_TOKENS.value} tokens, d_model {cfg.d_model}, expert ffn "
        f"{cfg.expert_ffn_dim}, E={num_experts}, top-2, capacity factor "
        f"{cfg.expert_capacity_factor}: per-device GFLOP (XLA cost analysis)")
  print(f"{'expert':>7}{'EP fwd+bwd':>12}{'EP fwd':>9}{'XLA fwd+bwd':>13}{'XLA fwd':>9}")
  result = {"expert_parallel": {}, "xla_partitioned": {}}
  for ep in sizes:
    result["expert_parallel"][ep] = _layer_flops(cfg, ep, expert_parallel=True)
    result["xla_partitioned"][ep] = _layer_flops(cfg, ep, expert_parallel=False)
    e, x = result["expert_parallel"][ep], result["xla_partitioned"][ep]
    gflop = lambda f, k: f"{f[k] / 1e9:.3f}" if k in f else "-"
    print(f"{ep:>7}{gflop(e, 'fwd_bwd'):>12}{gflop(e, 'fwd'):>9}"
          f"{gflop(x, 'fwd_bwd'):>13}{gflop(x, 'fwd'):>9}")
  ratio = lambda layer, name: {str(ep): round(f[name] / result[layer][1][name], 4)
                               for ep, f in result[layer].items()}
  print(json.dumps({
      "tokens": _TOKENS.value, "experts": num_experts,
      "capacity_factor": cfg.expert_capacity_factor,
      **{f"{name}_ratio_to_expert_1": {layer: ratio(layer, name) for layer in result}
         for name in _PASSES.value},
      "gflops_per_device": {layer: {str(ep): {k: round(v / 1e9, 4) for k, v in f.items()}
                                    for ep, f in r.items()} for layer, r in result.items()}}))


def main(argv):
  del argv
  if _EXPERT_PARALLEL.value:
    _expert_parallel_main()
    return
  results = {}
  print(f"{_TOKENS.value} tokens, d_model {_D_MODEL.value}, expert ffn {_FFN.value}, top_k 2, "
        f"forward+backward, "
        f"best of {_REPEATS.value} ({jax.devices()[0].platform})")
  print(f"{'E':>4}{'blocks ms':>12}{'ragged_dot ms':>15}{'dense ms':>11}{'blocks speedup':>16}")
  for e in map(int, _EXPERTS.value):
    r = _bench(e)
    results[e] = r
    print(f"{e:>4}{r['blocks'] * 1e3:>12.1f}{r['ragged_dot'] * 1e3:>15.1f}"
          f"{r['dense'] * 1e3:>11.1f}{r['dense'] / r['blocks']:>15.1f}x")
  largest = max(results)
  print(json.dumps({
      "speedup_vs_dense": round(results[largest]["dense"] / results[largest]["blocks"], 2),
      "experts": largest,
      "ms": {str(e): {k: round(v * 1e3, 2) for k, v in r.items() if k != "max_abs_diff_vs_dense"}
             for e, r in results.items()},
      "max_abs_diff_vs_dense": max(r["max_abs_diff_vs_dense"] for r in results.values())}))


if __name__ == "__main__":
  errors.run(main)
