"""The prepared device benchmark: model FLOPs utilisation of the policy update and memory
bandwidth utilisation of decode, on whatever devices JAX sees.

  python scripts/bench_device.py                                  # configs/moe_1b.py
  python scripts/bench_device.py --kernels=megablox,ragged_dot    # TPU: both MoE kernels
  python scripts/bench_device.py --smoke                          # tiny, on CPU (the suite)

It runs the run's own programs (`rl.programs`: the jitted RL update and the
sampler's prefill, start and decode loop) on the config's mesh over every device:
- train: one optimizer update on `rl.mini_batch_size` random sequences of the rollout
  length, best of `--repeats`; MFU = `roofline.train_flops` (6 x active params x tokens +
  causal attention) / time / (devices x the chip's published bf16 peak);
- decode: `rl.prompts_per_step x rl.group_size` responses of `sampler.max_new_tokens`
  tokens (no EOS), best of `--repeats`; bandwidth utilisation = the bytes a decode step must
  read (`roofline.decode_bytes`: weights but the embedding, and the KV cache) / step time /
  (devices x the published HBM bandwidth).
Peaks are by `device_kind` (`roofline.PUBLISHED`); a device with none published (a CPU) is
measured instead (`gemm_peak`, `read_bandwidth`), and the JSON says which. After the first
(compiling) call of each phase the script projects its total time and cuts the repeats to
stay within `--budget_s` (8 minutes). The last line is one JSON object.
"""
import dataclasses
import json
import os
import time

from absl import flags
import jax
import numpy as np

from minirl_jax import batch as batch_lib
from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import roofline
from minirl_jax import sharding
from minirl_jax.models import transformer
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import programs
from minirl_jax.rl import train_state
from minirl_jax.sampling import quantize as quantize_lib

_CONFIG = config_base.define_config_flag(__file__, "moe_1b")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiny config at small shapes (CPU, seconds).")
_KERNELS = flags.DEFINE_list("kernels", [], "MoE kernels (model.moe_impl) to time the "
                             "update with; default: the config's. Decode uses the first.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per phase (the best is kept).")
_BUDGET_S = flags.DEFINE_float("budget_s", 480.0, "Wall-clock budget the repeats are cut to.")

# --smoke: the tiny model at shapes that run in seconds on a CPU.
SMOKE = dict(data=dict(max_prompt_len=8), sampler=dict(max_new_tokens=16),
             rl=dict(prompts_per_step=4, group_size=2, mini_batch_size=8),
             sft=dict(max_steps=0))


def _config():
  if not _SMOKE.value:
    return _CONFIG.value
  config = config_base.sibling(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                            "tiny.py"), "tiny")
  for section, values in SMOKE.items():
    config[section].update(values)
  return config


def _peaks(device):
  """(FLOP/s, bytes/s, source) of one device."""
  published = roofline.published_peaks(device.device_kind)
  if published:
    return (*published, "published")
  return roofline.gemm_peak(), roofline.read_bandwidth(), "measured"


def _random_batch(abstract: batch_lib.TrainBatch, s: settings_lib.Settings):
  """A mini-batch of random tokens with the objective's inputs, placed as `abstract`."""
  rows, length = abstract.tokens.shape
  rng = np.random.default_rng(s.seed)
  prompt = length - s.sampler.max_new_tokens
  loss_mask = np.broadcast_to(np.arange(length) >= prompt, (rows, length)).astype(np.float32)
  old_logp = -rng.uniform(0.5, 3.0, (rows, length)).astype(np.float32) * loss_mask
  host = batch_lib.TrainBatch(
      tokens=rng.integers(0, s.model.vocab_size, (rows, length), dtype=np.int32),
      attn_mask=np.ones((rows, length), bool), loss_mask=loss_mask,
      advantages=rng.standard_normal(rows).astype(np.float32), old_logp=old_logp,
      mu_logp=old_logp, num_sequences=np.float32(rows), num_tokens=loss_mask.sum(),
      group_length_mean=np.full(rows, float(s.sampler.max_new_tokens), np.float32))
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), host, abstract)


class Clock:
  """The script's wall clock and budget: how many repeats of a timed call still fit."""

  def __init__(self, budget_s: float):
    self.start, self.budget_s = time.perf_counter(), budget_s

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def repeats(self, wanted: int, call_s: float, reserve_s: float) -> int:
    room = self.budget_s - self.elapsed() - reserve_s
    fits = max(1, int(room // max(call_s, 1e-9)))
    if fits < wanted:
      print(f"  budget: {fits} of {wanted} repeats fit ({call_s:.2f} s each)")
    return min(wanted, fits)


def _timed(call, repeats: int):
  """(seconds of the first call, best seconds of `repeats` more, last result); `call()`
  returns something to block on."""
  start = time.perf_counter()
  out = jax.block_until_ready(call())
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    best = min(best, time.perf_counter() - start)
  return first, best, out


def bench_train(s, mesh, clock, peak_flops) -> dict:
  built = programs.build(s, mesh)
  update = built["rl_step"]
  state, _ = train_state.random_init(s, mesh, jax.random.key(s.seed))
  batch = _random_batch(update.args[1], s)
  holder = {"state": state}

  def step():
    holder["state"], metrics = update(holder["state"], batch)
    return metrics
  compile_s, _, _ = _timed(step, 0)
  _, step_s, _ = _timed(step, clock.repeats(_REPEATS.value, compile_s, reserve_s=60))
  rows, length = batch.tokens.shape
  flops = roofline.train_flops(s.model, rows, length)
  devices = mesh.size
  return {"moe_impl": s.model.moe_impl, "rows": rows, "length": length,
          "first_call_s": round(compile_s, 3), "step_s": round(step_s, 5),
          "model_tflops_per_s": round(flops / step_s / 1e12, 4),
          "mfu": round(flops / step_s / (devices * peak_flops), 4),
          "params": holder["state"].params}


def bench_decode(s, mesh, params, clock, peak_bandwidth) -> dict:
  built = programs.build(s, mesh)
  prefill, start, decode = built["prefill"], built["start"], built["decode"]
  weights = jax.jit(lambda p: quantize_lib.for_sampler(p, s.sampler,
                                                       transformer.param_axes(s.model)),
                    out_shardings=jax.tree.map(lambda a: a.sharding, decode.args[0]))(params)
  _, tokens, mask, _ = prefill.args
  rng = np.random.default_rng(s.seed)
  tokens = jax.device_put(rng.integers(0, s.model.vocab_size, tokens.shape, dtype=np.int32),
                          tokens.sharding)
  mask = jax.device_put(np.ones(mask.shape, bool), mask.sharding)
  key = jax.random.key(s.seed)

  def fresh():
    prefix, rollout = prefill(weights, tokens, mask, key)
    return prefix, start(prefix, rollout)

  def timed_decode():
    prefix, carry = jax.block_until_ready(fresh())  # decode donates its carry
    begin = time.perf_counter()
    out = jax.block_until_ready(decode(weights, carry, prefix))
    return time.perf_counter() - begin, out

  cache = jax.eval_shape(lambda: fresh()[1].cache)
  first_s, out = timed_decode()
  loop_s = first_s
  for _ in range(clock.repeats(_REPEATS.value, first_s, reserve_s=10)):
    loop_s = min(loop_s, timed_decode()[0])
  steps = int(out.step)
  step_s = loop_s / steps
  step_bytes = roofline.decode_bytes(weights, cache)
  rows = out.rollout.tokens.shape[0]
  return {"sampler_dtype": s.sampler.dtype, "responses": rows, "decode_steps": steps,
          "first_call_s": round(first_s, 3), "step_ms": round(step_s * 1e3, 4),
          "decode_tok_s": round(rows * steps / loop_s, 1),
          "step_mb": round(step_bytes / 1e6, 2),
          "bandwidth_gb_s": round(step_bytes / step_s / 1e9, 2),
          "bandwidth_utilisation": round(step_bytes / step_s / (mesh.size * peak_bandwidth),
                                         4)}


def main(argv):
  del argv
  clock = Clock(_BUDGET_S.value)
  config = _config()
  device = jax.devices()[0]
  peak_flops, peak_bandwidth, source = _peaks(device)
  s = settings_lib.from_config(config)
  # Random weights: no EOS, so every response decodes max_new_tokens.
  s = dataclasses.replace(s, sampler=dataclasses.replace(s.sampler, eos_ids=()))
  mesh = sharding.make_mesh(s.mesh)
  print(f"{jax.device_count()} x {device.device_kind} ({device.platform}); peaks ({source}): "
        f"{peak_flops / 1e12:.1f} TFLOP/s, {peak_bandwidth / 1e9:.0f} GB/s per device; "
        f"mesh {dict(mesh.shape)}")
  kernels = _KERNELS.value or [s.model.moe_impl]
  train, params = {}, None
  for kernel in kernels:
    sk = dataclasses.replace(s, model=dataclasses.replace(s.model, moe_impl=kernel))
    r = bench_train(sk, mesh, clock, peak_flops)
    params = r.pop("params") if params is None else params
    train[kernel] = r
    print(f"train  {kernel:<11} {r['rows']} x {r['length']} tokens: {r['step_s'] * 1e3:.1f} "
          f"ms/step, {r['model_tflops_per_s']:.2f} TFLOP/s, MFU {r['mfu']:.1%} "
          f"(first call {r['first_call_s']:.1f} s)")
  sd = dataclasses.replace(s, model=dataclasses.replace(s.model, moe_impl=kernels[0]))
  decode = bench_decode(sd, mesh, params, clock, peak_bandwidth)
  print(f"decode {decode['sampler_dtype']:<11} {decode['responses']} responses x "
        f"{decode['decode_steps']} steps: {decode['step_ms']:.3f} ms/step, "
        f"{decode['step_mb']:.0f} MB/step, {decode['bandwidth_gb_s']:.1f} GB/s, "
        f"{decode['bandwidth_utilisation']:.1%} of peak bandwidth "
        f"(first call {decode['first_call_s']:.1f} s)")
  wall = clock.elapsed()
  print(f"wall {wall:.0f} s of a {clock.budget_s:.0f} s budget")
  print(json.dumps({
      "device_kind": device.device_kind, "platform": device.platform,
      "devices": jax.device_count(), "peaks_source": source,
      "peak_tflops_per_device": round(peak_flops / 1e12, 2),
      "peak_bandwidth_gb_s_per_device": round(peak_bandwidth / 1e9, 1),
      "params_total": sum(x.size for x in jax.tree.leaves(params)),
      "params_active": roofline.active_matmul_params(s.model),
      "train": train, "mfu": train[kernels[0]]["mfu"], "decode": decode,
      "bandwidth_utilisation": decode["bandwidth_utilisation"], "wall_s": round(wall, 1),
      "within_budget": wall <= clock.budget_s}))


if __name__ == "__main__":
  errors.run(main)
