"""Times the RL policy-update step (one optimizer update of the objective, fwd + bwd) and
sets its analytic FLOP/s against the GEMM peak measured here.

  python scripts/bench_train.py [--config=configs/bench.py] [--rows=16 --length=160]
Prints a table; the last line is one JSON object: step seconds per MoE kernel, model
FLOP/s (6 x active params x tokens + attention, `roofline.train_flops`), the measured
[2048, 2048] float32 GEMM peak and `fraction_of_gemm_peak` for the default kernel.
"""
import dataclasses
import json

from absl import flags
import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import roofline
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import step as step_lib
from minirl_jax.rl import train_state
from minirl_jax.models import transformer

_CONFIG = config_base.define_config_flag(__file__, "bench")
_ROWS = flags.DEFINE_integer("rows", 16, "Sequences in the mini-batch.")
_LENGTH = flags.DEFINE_integer("length", 160, "Tokens per sequence (prompt + completion).")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Of which prompt (no loss).")
_KERNELS = flags.DEFINE_list("kernels", ["blocks", "ragged_dot"],
                             "MoE kernels (model.moe_impl) to time; the first is the default.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (best is reported).")


def _batch(cfg, rows, length, prompt_len):
  """A mini-batch of random tokens with the objective's inputs; R3-free (routes live)."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  loss_mask = (jnp.arange(length) >= prompt_len)[None].repeat(rows, 0).astype(jnp.float32)
  old_logp = -jax.random.uniform(k2, (rows, length), minval=0.5, maxval=3.0) * loss_mask
  return batch_lib.TrainBatch(
      tokens=jax.random.randint(k1, (rows, length), 0, cfg.vocab_size),
      attn_mask=jnp.ones((rows, length), bool), loss_mask=loss_mask,
      advantages=jax.random.normal(k3, (rows,)), old_logp=old_logp, mu_logp=old_logp,
      num_sequences=jnp.float32(rows), num_tokens=jnp.sum(loss_mask))


def _step_seconds(s: settings_lib.Settings, cfg, batch) -> float:
  optimizer = train_state.optimizers(dataclasses.replace(s, model=cfg)).rl
  state = train_state.init_state(transformer.init_params(cfg, jax.random.key(s.seed)), optimizer)
  step = jax.jit(lambda state, batch: step_lib.rl_step(
      state, batch, model_cfg=cfg, obj_cfg=s.objective, optimizer=optimizer))
  return roofline.best_seconds(lambda: step(state, batch)[0].params, _REPEATS.value)


def main(argv):
  del argv
  s = settings_lib.from_config(_CONFIG.value)
  rows, length = _ROWS.value, _LENGTH.value
  batch = _batch(s.model, rows, length, _PROMPT.value)
  flops = roofline.train_flops(s.model, rows, length)
  peak = roofline.gemm_peak()
  print(f"{jax.devices()[0].platform}: {s.objective.name} update, {rows} x {length} tokens, "
        f"{flops / 1e9:.2f} GFLOP (analytic); float32 GEMM peak {peak / 1e9:.1f} GFLOP/s; "
        f"best of {_REPEATS.value}")
  print(f"{'moe_impl':<12}{'step s':>9}{'GFLOP/s':>10}{'of peak':>9}")
  seconds = {}
  for kernel in _KERNELS.value:
    seconds[kernel] = _step_seconds(s, dataclasses.replace(s.model, moe_impl=kernel), batch)
    print(f"{kernel:<12}{seconds[kernel]:>9.3f}{flops / seconds[kernel] / 1e9:>10.1f}"
          f"{flops / seconds[kernel] / peak:>9.1%}")
  default = _KERNELS.value[0]
  print(json.dumps({
      "rows": rows, "length": length, "gflop": round(flops / 1e9, 3),
      "step_s": {k: round(v, 4) for k, v in seconds.items()},
      "gflop_s": round(flops / seconds[default] / 1e9, 2),
      "gemm_peak_gflop_s": round(peak / 1e9, 2),
      "fraction_of_gemm_peak": round(flops / seconds[default] / peak, 4)}))


if __name__ == "__main__":
  errors.run(main)
