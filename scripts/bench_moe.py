"""Times sparse dropless MoE dispatch against the dense all-experts reference (fwd + bwd).

  python scripts/bench_moe.py
Last line: one JSON object with `speedup_vs_dense` (blocks kernel, E=64) and per-E timings.
"""
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import errors
from minirl_jax.models import moe
from minirl_jax.models import moe_reference
from minirl_jax.models.config import ModelConfig

_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "16", "64"], "Expert counts to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (best is reported).")


def _time(fn, *args):
  jax.block_until_ready(fn(*args))  # compile
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def _bench(num_experts, d=256, f=512, top_k=2):
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
    row[name] = _time(step, p, x)
  for name in ("blocks", "ragged_dot"):
    np.testing.assert_allclose(outputs[name], outputs["dense"], rtol=2e-3, atol=2e-3)
  row["max_abs_diff_vs_dense"] = float(np.max(np.abs(outputs["blocks"] - outputs["dense"])))
  return row


def main(argv):
  del argv
  results = {}
  print(f"{_TOKENS.value} tokens, d_model 256, expert ffn 512, top_k 2, forward+backward, "
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
  app.run(errors.reporting(main))
