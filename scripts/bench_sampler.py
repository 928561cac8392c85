"""Times the sampler's decode against the memory roofline measured on this machine.

  python scripts/bench_sampler.py            # ~2 minutes on a 2-core CPU
  python scripts/bench_sampler.py --full     # more dtypes and batch 64 (~15 minutes)
Default shapes: configs/bench.py (the Tunix comparison's model), batch 16, prompt 32, 128 new
tokens, no EOS. Per engine it reports decode tokens/s and the bytes a decode step must read
(weights but the embedding table, and the whole KV cache: `roofline.decode_bytes`) divided
by the step time, as a fraction of the read bandwidth the script measures. Each engine is
timed alternately with its "previous" twin, the decode before the dense pass and the
unrolled layers (`model.moe_dense_max_group=0`, `sampler.scan_layers=True`), so their
ratio is measured in one run. Also: a decode step against a no-cache step (the full
forward over every position) and the compilations for 5 prompt lengths. The last line is
one JSON object.
"""
import dataclasses
import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import roofline
from minirl_jax.models import config as model_config
from minirl_jax.models import transformer
from minirl_jax.sampling import quantize
from minirl_jax.sampling import sampler
from minirl_jax.sampling.config import SamplerConfig

_CONFIG = config_base.define_config_flag(__file__, "bench")
_FULL = flags.DEFINE_bool("full", False, "The long sweep: --batches=16,64 and four dtypes.")
_BATCHES = flags.DEFINE_list("batches", ["16"], "Batch sizes to time.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "int8"],
                            "Sampler dtypes to time, optionally :activation_dtype.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt length.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row (no EOS).")
_LENGTHS = flags.DEFINE_list("lengths", ["9", "14", "20", "27", "31"],
                             "Prompt lengths generated one after another (compilation count).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (best is reported).")
FULL_SWEEP = dict(batches=["16", "64"], dtypes=["float32", "bfloat16", "int8", "int8:bfloat16"])


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampler_cfg"))
def _no_cache_step(params, tokens_BT, mask_BT, rng, *, model_cfg, sampler_cfg):
  """One step of decoding without a cache: the full forward over all T positions, then a
  token sampled at the last. A no-cache loop runs this at the same static shape per token."""
  cfg = sampler.engine_config(model_cfg, sampler_cfg)
  logits_BTV, _ = transformer.forward(params, tokens_BT, cfg=cfg, attn_mask_BT=mask_BT)
  return sampler.sample_token(logits_BTV[:, -1], rng, sampler_cfg)[0]


def _kl_vs_float32(params, qparams, rollout, cfg, scfg):
  """Full-vocabulary KL(mu || float32 model) on the rollout's completion tokens."""
  fwd = jax.jit(transformer.forward, static_argnames="cfg")
  logits_mu, _ = fwd(qparams, rollout.tokens, cfg=sampler.engine_config(cfg, scfg),
                     attn_mask_BT=rollout.attn_mask)
  logits_pi, _ = fwd(params, rollout.tokens, cfg=cfg, attn_mask_BT=rollout.attn_mask)
  logp_mu, logp_pi = jax.nn.log_softmax(logits_mu), jax.nn.log_softmax(logits_pi)
  kl_BT = jnp.sum(jnp.exp(logp_mu) * (logp_mu - logp_pi), -1)[:, :-1]
  mask_BT = rollout.completion_mask[:, 1:]
  return float(jnp.sum(kl_BT * mask_BT) / jnp.sum(mask_BT))


class _Engine:
  """One (dtype spec, batch, model config): its prompts, quantised weights and timings."""

  def __init__(self, params, spec, b, cfg, scan_layers=False):
    dtype, _, activations = spec.partition(":")
    self.scfg = SamplerConfig(dtype=dtype, activation_dtype=activations or None,
                              max_new_tokens=_NEW.value, eos_ids=(), prompt_bucket=16,
                              scan_layers=scan_layers)
    self.qparams = quantize.for_sampler(params, self.scfg, transformer.param_axes(cfg))
    self.configs = dict(model_cfg=cfg, sampler_cfg=self.scfg)
    self.b, self.rng = b, jax.random.key(1)
    self.lengths = jnp.full((b,), _PROMPT.value)
    self.prompts = jax.random.randint(jax.random.key(b), (b, _PROMPT.value), 0, cfg.vocab_size)
    self.tokens, self.mask = sampler.bucket_prompts(self.prompts, self.lengths, self.scfg)
    self.decode_s = float("inf")

  def prefill(self):
    return sampler.prefill_jit(self.qparams, self.tokens, self.mask, self.rng, **self.configs)

  def generate(self):
    return sampler.generate(self.qparams, self.prompts, self.lengths, self.rng, **self.configs)

  def time_decode(self):
    """One timed decode loop (decode donates its state: a fresh prefill each time)."""
    state = jax.block_until_ready(self.prefill())
    start = time.perf_counter()
    jax.block_until_ready(sampler.decode_jit(self.qparams, state, **self.configs).tokens)
    self.decode_s = min(self.decode_s, time.perf_counter() - start)

  def step_bytes(self):
    return roofline.decode_bytes(self.qparams, jax.eval_shape(self.prefill).cache)


def _count_compilations(params, cfg, lengths):
  """Generates prompts of each length in turn; returns how many programs were compiled."""
  scfg = SamplerConfig(max_new_tokens=_NEW.value, eos_ids=(), prompt_bucket=16)
  params = quantize.for_sampler(params, scfg, transformer.param_axes(cfg))
  before = sampler.TRACES["prefill"]
  for length in lengths:  # batch 8 is timed nowhere else: every compilation counts
    prompts = jax.random.randint(jax.random.key(length), (8, length), 0, cfg.vocab_size)
    jax.block_until_ready(sampler.generate(params, prompts, jnp.full((8,), length),
                                           jax.random.key(1), model_cfg=cfg,
                                           sampler_cfg=scfg).tokens)
  return sampler.TRACES["prefill"] - before


def main(argv):
  del argv
  batches, dtypes = _BATCHES.value, _DTYPES.value
  if _FULL.value:
    batches, dtypes = FULL_SWEEP["batches"], FULL_SWEEP["dtypes"]
  cfg = model_config.from_dict(_CONFIG.value.model)
  previous_cfg = dataclasses.replace(cfg, moe_dense_max_group=0)
  params = transformer.init_params(cfg, jax.random.key(_CONFIG.value.seed))
  bandwidth = roofline.read_bandwidth()
  print(f"{jax.devices()[0].platform}: prompt {_PROMPT.value}, {_NEW.value} new tokens, best "
        f"of {_REPEATS.value}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
  engines = {}
  for spec in dtypes:
    for b in map(int, batches):
      engines[f"{spec}/b{b}"] = _Engine(params, spec, b, cfg)
      engines[f"{spec}/b{b}/previous"] = _Engine(params, spec, b, previous_cfg,
                                                 scan_layers=True)
  for e in engines.values():  # compile
    jax.block_until_ready(e.generate().tokens)
  for _ in range(_REPEATS.value):  # alternate the engines: their ratios share the machine
    for e in engines.values():
      e.time_decode()
  print(f"{'engine':<26}{'MB/step':>9}{'ms/step':>9}{'decode tok/s':>14}{'GB/s':>7}"
        f"{'of read bw':>12}{'KL vs f32':>11}")
  rows = {}
  for name, e in engines.items():
    step_s, nbytes = e.decode_s / (_NEW.value - 1), e.step_bytes()
    r = rows[name] = dict(decode_tok_s=e.b / step_s, step_ms=step_s * 1e3,
                          step_mb=nbytes / 1e6, bandwidth_fraction=nbytes / step_s / bandwidth)
    r["kl"] = _kl_vs_float32(params, e.qparams, e.generate(), cfg, e.scfg)
    print(f"{name:<26}{r['step_mb']:>9.1f}{r['step_ms']:>9.2f}{r['decode_tok_s']:>14.1f}"
          f"{nbytes / step_s / 1e9:>7.1f}{r['bandwidth_fraction']:>12.1%}{r['kl']:>11.2e}")
  headline = f"{dtypes[0]}/b{batches[0]}"
  first = engines[headline]
  rollout = first.generate()
  no_cache_s = roofline.best_seconds(lambda: _no_cache_step(
      first.qparams, rollout.tokens, rollout.attn_mask, first.rng, **first.configs),
      _REPEATS.value)
  kv_speedup = no_cache_s / (rows[headline]["step_ms"] / 1e3)
  print(f"KV cache: a decode step {rows[headline]['step_ms']:.2f} ms vs {no_cache_s * 1e3:.1f} ms "
        f"without a cache (forward over all {rollout.tokens.shape[1]} positions): "
        f"{kv_speedup:.1f}x ({headline})")
  lengths = list(map(int, _LENGTHS.value))
  compilations = _count_compilations(params, cfg, lengths)
  print(f"prompt lengths {lengths}, prompt_bucket 16: {compilations} compilations "
        "(each one prefill + one decode program)")
  print(json.dumps({
      "engine": headline,
      "decode_tok_s": round(rows[headline]["decode_tok_s"], 1),
      "bandwidth_fraction": round(rows[headline]["bandwidth_fraction"], 4),
      "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
      "speedup_vs_previous": {
          k: round(r["decode_tok_s"] / rows[f"{k}/previous"]["decode_tok_s"], 3)
          for k, r in rows.items() if not k.endswith("previous")},
      "kv_cache_step_speedup": round(kv_speedup, 2),
      "compilations": compilations, "prompt_lengths_tried": lengths,
      "rows": {k: {f: round(v, 4) for f, v in r.items()} for k, r in rows.items()}}))


if __name__ == "__main__":
  app.run(errors.reporting(main))
