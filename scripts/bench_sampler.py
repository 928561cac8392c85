"""Times the sampler on configs/small.py: KV-cached decode vs a no-cache loop, per dtype.

  python scripts/bench_sampler.py --config=configs/small.py
Prints a table; the last line is one JSON object (kv_cache_speedup, int8_weight_bytes_vs_bf16,
compilations, prompt_lengths_tried, decode_tok_s, ...).
"""
import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax.models import config as model_config
from minirl_jax.models import transformer
from minirl_jax.sampling import quantize
from minirl_jax.sampling import sampler
from minirl_jax.sampling.config import SamplerConfig

_CONFIG = config_base.define_config_flag(__file__, "small")
_BATCHES = flags.DEFINE_list("batches", ["16", "64"], "Batch sizes to time.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16", "int8", "int8:bfloat16"],
                            "Sampler dtypes to time, optionally :activation_dtype.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt length.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row (no EOS).")
_LENGTHS = flags.DEFINE_list("lengths", ["9", "14", "20", "27", "31"],
                             "Prompt lengths generated one after another (compilation count).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (best is reported).")


def _best(fn):
  """(seconds of the first call, best seconds of the following calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return first, best


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampler_cfg"))
def _naive_generate(params, tokens_BP, mask_BP, rng, *, model_cfg, sampler_cfg):
  """No cache: the full forward over all T positions for every new token."""
  cfg = sampler.engine_config(model_cfg, sampler_cfg)
  b, p = tokens_BP.shape
  n = sampler_cfg.max_new_tokens
  tokens_BT = jnp.pad(tokens_BP, ((0, 0), (0, n)))
  mask_BT = jnp.pad(mask_BP, ((0, 0), (0, n)))

  def body(i, carry):
    tokens_BT, mask_BT = carry
    logits_BTV, _ = transformer.forward(params, tokens_BT, cfg=cfg, attn_mask_BT=mask_BT)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, p + i - 1, 1, keepdims=False)
    tok_B, _, _ = sampler.sample_token(logits_BV, jax.random.fold_in(rng, i), sampler_cfg)
    tokens_BT = jax.lax.dynamic_update_slice_in_dim(tokens_BT, tok_B[:, None], p + i, 1)
    mask_BT = jax.lax.dynamic_update_slice_in_dim(mask_BT, jnp.ones((b, 1), bool), p + i, 1)
    return tokens_BT, mask_BT

  return jax.lax.fori_loop(0, n, body, (tokens_BT, mask_BT))[0]


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


def _time_engine(params, spec, b, cfg):
  """Times one (dtype spec, batch): compile, prefill, decode loop and whole generate."""
  dtype, _, activations = spec.partition(":")
  axes = transformer.param_axes(cfg)
  qparams = quantize.quantize(params, dtype, axes)
  scfg = SamplerConfig(dtype=dtype, activation_dtype=activations or None,
                       max_new_tokens=_NEW.value, eos_ids=(), prompt_bucket=16)
  configs = dict(model_cfg=cfg, sampler_cfg=scfg)
  rng, lengths = jax.random.key(1), jnp.full((b,), _PROMPT.value)
  prompts = jax.random.randint(jax.random.key(b), (b, _PROMPT.value), 0, cfg.vocab_size)
  tokens, mask = sampler.bucket_prompts(prompts, lengths, scfg)
  generate = lambda: sampler.generate(qparams, prompts, lengths, rng, **configs)
  prefill = lambda: sampler.prefill_jit(qparams, tokens, mask, rng, **configs)
  first, gen_s = _best(lambda: generate().tokens)
  _, prefill_s = _best(prefill)
  states = [prefill() for _ in range(_REPEATS.value + 1)]  # decode donates its state
  _, decode_s = _best(lambda: sampler.decode_jit(qparams, states.pop(), **configs).tokens)
  _, quantize_s = _best(lambda: quantize.quantize(params, dtype, axes))
  row = dict(bytes=quantize.weight_bytes(qparams), compile_s=first - gen_s, quantize_s=quantize_s,
             prefill_s=prefill_s, decode_tok_s=b * (_NEW.value - 1) / decode_s,
             generate_tok_s=b * _NEW.value / gen_s,
             kl=_kl_vs_float32(params, qparams, generate(), cfg, scfg))
  if spec == "float32":
    _, naive_s = _best(lambda: _naive_generate(qparams, tokens, mask, rng, **configs))
    row["naive_tok_s"] = b * _NEW.value / naive_s
  return row


def _count_compilations(params, cfg, lengths):
  """Generates prompts of each length in turn; returns how many programs were compiled."""
  scfg = SamplerConfig(max_new_tokens=_NEW.value, eos_ids=(), prompt_bucket=16)
  before = sampler.TRACES["prefill"]
  for length in lengths:  # batch 8 is timed nowhere else: every compilation counts
    prompts = jax.random.randint(jax.random.key(length), (8, length), 0, cfg.vocab_size)
    jax.block_until_ready(sampler.generate(params, prompts, jnp.full((8,), length),
                                           jax.random.key(1), model_cfg=cfg,
                                           sampler_cfg=scfg).tokens)
  return sampler.TRACES["prefill"] - before


def main(argv):
  del argv
  cfg = model_config.from_dict(_CONFIG.value.model)
  params = transformer.init_params(cfg, jax.random.key(_CONFIG.value.seed))
  print(f"{jax.devices()[0].platform}, prompt {_PROMPT.value}, {_NEW.value} new tokens, "
        f"best of {_REPEATS.value}")
  print(f"{'dtype[:act]':<14}{'batch':>6}{'weights KB':>12}{'quantize ms':>13}{'compile s':>11}"
        f"{'prefill ms':>12}{'decode tok/s':>14}{'generate tok/s':>16}{'KL vs f32':>11}")
  rows = {}
  for spec in _DTYPES.value:
    for b in map(int, _BATCHES.value):
      r = rows[f"{spec}/b{b}"] = _time_engine(params, spec, b, cfg)
      print(f"{spec:<14}{b:>6}{r['bytes'] / 1024:>12.1f}{r['quantize_s'] * 1e3:>13.1f}"
            f"{r['compile_s']:>11.2f}"
            f"{r['prefill_s'] * 1e3:>12.1f}{r['decode_tok_s']:>14.1f}"
            f"{r['generate_tok_s']:>16.1f}{r['kl']:>11.2e}")
      if "naive_tok_s" in r:
        print(f"{'naive float32':<14}{b:>6}{'(no KV cache: full forward per token)':>62}"
              f"{r['naive_tok_s']:>16.1f}")
  lengths = list(map(int, _LENGTHS.value))
  compilations = _count_compilations(params, cfg, lengths)
  print(f"prompt lengths {lengths}, prompt_bucket 16: {compilations} compilations "
        "(each one prefill + one decode program)")
  first = f"float32/b{_BATCHES.value[0]}"
  nbytes = {k.split("/")[0].split(":")[0]: r["bytes"] for k, r in rows.items()}
  print(json.dumps({
      "kv_cache_speedup": round(rows[first]["generate_tok_s"] / rows[first]["naive_tok_s"], 2),
      "int8_weight_bytes_vs_bf16": round(nbytes["int8"] / nbytes["bfloat16"], 4),
      "compilations": compilations, "prompt_lengths_tried": lengths,
      "decode_tok_s": {k: round(r["decode_tok_s"], 1) for k, r in rows.items()},
      "generate_tok_s": {k: round(r["generate_tok_s"], 1) for k, r in rows.items()},
      "compile_s": {k: round(r["compile_s"], 2) for k, r in rows.items()},
      "weight_bytes": nbytes,
      "kl_vs_float32": {k: float(f"{r['kl']:.3g}") for k, r in rows.items()
                        if k.endswith(f"/b{_BATCHES.value[0]}")}}))


if __name__ == "__main__":
  app.run(errors.reporting(main))
