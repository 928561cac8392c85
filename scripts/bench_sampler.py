"""Times the sampler: decode against the memory roofline, and one RL step's rollouts.

  python scripts/bench_sampler.py              # ~3 minutes on a 2-core CPU
  python scripts/bench_sampler.py --previous   # + the decode before the dense pass
  python scripts/bench_sampler.py --full       # more dtypes and batch 64 (~15 minutes)
  python scripts/bench_sampler.py --only_rollouts --slots=8,16,32

Decode section: configs/bench.py (the Tunix comparison's model), batch 16, prompt 32, 128 new
tokens, no EOS. Per engine it reports decode tokens/s and the bytes a decode step must read
(weights but the embedding table, and the whole KV cache: `roofline.decode_bytes`) divided
by the step time, as a fraction of the read bandwidth the script measures. With
`--previous` each engine is timed alternately with its "previous" twin, the decode before
the dense pass and the unrolled layers (`model.moe_dense_max_group=0`,
`sampler.scan_layers=True`). Also: a decode step against a no-cache step (the full forward
over every position) and the compilations for 5 prompt lengths.

Rollout section: one RL step of `--rollout_config` (configs/paper_small.py: 8 prompts x 8
responses), each response's length imposed from the chain task's worked solutions (or
`--response_lengths`). The static engine (a slot per response, every response prefilled
alone: today's batch, which waits for its longest row) against continuous batching with
`--slots` (one prefill per prompt), alternated in one run, per sampler dtype: useful
tokens/s (tokens the responses keep) and the decode row-steps spent on no response. The
last line is one JSON object.
"""
import dataclasses
import functools
import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import roofline
from minirl_jax.models import config as model_config
from minirl_jax.models import transformer
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import settings as settings_lib
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
_ROLLOUT_CONFIG = config_base.define_config_flag(__file__, "paper_small", name="rollout_config")
_RESPONSE_LENGTHS = flags.DEFINE_string(
    "response_lengths", "chain", "The rollout section's response lengths: 'chain' (the "
    "rollout config's training solutions + EOS) or a comma list of token counts, cycled.")
_ROLLOUT_DTYPES = flags.DEFINE_list("rollout_dtypes", ["float32", "int8", "fp8"],
                                    "Sampler dtypes of the rollout section.")
_SLOTS = flags.DEFINE_list("slots", ["16"], "Continuous batching's slots in the rollout "
                           "section (each against the static batch: a slot per response).")
_ONLY_ROLLOUTS = flags.DEFINE_bool("only_rollouts", False, "Run the rollout section only.")
_PREVIOUS = flags.DEFINE_bool("previous", False, "Time each decode engine against the decode "
                              "before the dense pass and the unrolled layers too.")
FULL_SWEEP = dict(batches=["16", "64"], dtypes=["float32", "bfloat16", "int8", "int8:bfloat16"])


@functools.partial(jax.jit, static_argnames=("model_cfg", "sampler_cfg"))
def _no_cache_step(params, tokens_BT, mask_BT, rng, *, model_cfg, sampler_cfg):
  """One step of decoding without a cache: the full forward over all T positions, then a
  token sampled at the last. A no-cache loop runs this at the same static shape per token."""
  cfg = sampler.engine_config(model_cfg, sampler_cfg)
  logits_BTV, _ = transformer.forward(params, tokens_BT, cfg=cfg, attn_mask_BT=mask_BT)
  keys_B = jax.random.split(rng, tokens_BT.shape[0])
  return sampler.sample_token(logits_BTV[:, -1], keys_B, sampler_cfg)[0]


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
    self.configs = dict(model_cfg=cfg, sampler_cfg=self.scfg, group_size=1)
    self.b, self.rng = b, jax.random.key(1)
    self.lengths = jnp.full((b,), _PROMPT.value)
    self.prompts = jax.random.randint(jax.random.key(b), (b, _PROMPT.value), 0, cfg.vocab_size)
    self.tokens, self.mask = sampler.bucket_prompts(self.prompts, self.lengths, self.scfg)
    self.decode_s = float("inf")

  def prefill(self):
    """(Prefix, the decode loop's first carry: every row in its own slot)."""
    prefix, first = sampler.prefill_jit(self.qparams, self.tokens, self.mask, self.rng,
                                        **self.configs)
    return prefix, sampler.start_jit(prefix, first, slots=self.b, shards=1, **self.configs)

  def generate(self):
    return sampler.generate(self.qparams, self.prompts, self.lengths, self.rng, **self.configs)

  def time_decode(self):
    """One timed decode loop (decode donates its state: a fresh prefill each time)."""
    prefix, state = jax.block_until_ready(self.prefill())
    start = time.perf_counter()
    jax.block_until_ready(sampler.decode_jit(self.qparams, state, prefix,
                                             **self.configs).rollout.tokens)
    self.decode_s = min(self.decode_s, time.perf_counter() - start)

  def step_bytes(self):
    return roofline.decode_bytes(self.qparams, jax.eval_shape(self.prefill)[1].cache)


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


class _Rollouts:
  """One RL step's rollouts on the rollout config (`--rollout_config`): its prompts, G
  responses each, and every response's length imposed (`sampler.generate(limits=)`; no
  EOS), so an untrained model decodes the task's length distribution."""

  def __init__(self, config, spec, slots, lengths_M):
    self.s = settings_lib.from_config(config)
    n, g = self.s.rl.prompts_per_step, self.s.rl.group_size
    dtype, _, activations = spec.partition(":")
    self.scfg = dataclasses.replace(self.s.sampler, dtype=dtype, eos_ids=(),
                                    activation_dtype=activations or None)
    params = transformer.init_params(self.s.model, jax.random.key(config.seed))
    self.qparams = quantize.for_sampler(params, self.scfg, transformer.param_axes(self.s.model))
    data = rl_data.build(self.s)
    encoded = [data.tokenizer.encode(data.train_records[i]["prompt"]) for i in range(n)]
    prompts = np.zeros((n, max(map(len, encoded))), np.int32)
    for row, ids in zip(prompts, encoded):
      row[len(row) - len(ids):] = ids
    tokens, mask = sampler.bucket_prompts(prompts, [len(e) for e in encoded], self.scfg)
    self.limits = jnp.asarray(np.minimum(lengths_M, self.scfg.max_new_tokens), jnp.int32)
    self.static = slots == 0
    if self.static:  # today's engine: every response prefilled alone, one slot each
      tokens, mask = (jnp.repeat(x, g, axis=0) for x in (tokens, mask))
      g, slots = 1, n * g
    self.inputs = (tokens, mask, jax.random.key(1), self.limits)
    self.slots, self.seconds = slots, []
    self.configs = dict(model_cfg=self.s.model, sampler_cfg=self.scfg, group_size=g)

  def run(self):
    """One timed rollout; returns the decode steps it ran."""
    start = time.perf_counter()
    prefix, first = sampler.prefill_jit(self.qparams, *self.inputs, **self.configs)
    state = sampler.start_jit(prefix, first, slots=self.slots, shards=1, **self.configs)
    steps = int(sampler.decode_jit(self.qparams, state, prefix, **self.configs).step)
    self.seconds.append(time.perf_counter() - start)
    return steps

  def figures(self, steps):
    useful = int(jnp.sum(self.limits))  # every token a response keeps
    decoded = self.slots * steps  # row-steps: the slots times the decode steps
    seconds = float(np.median(self.seconds))
    return dict(seconds=seconds, useful_tok_s=useful / seconds, decode_steps=steps,
                wasted_row_steps=decoded - (useful - len(self.limits)),
                wasted_frac=1 - (useful - len(self.limits)) / decoded)


def _alternate(engines: dict, time_one) -> None:
  """Times each engine `--repeats` times, in turn, so their ratios share the machine."""
  for _ in range(_REPEATS.value):
    for e in engines.values():
      time_one(e)


def response_lengths(config, count: int) -> np.ndarray:
  """`--response_lengths` as `count` token counts: 'chain' = the rollout config's training
  solutions, tokenised, plus EOS; else the given comma list, cycled."""
  if _RESPONSE_LENGTHS.value != "chain":
    given = [int(x) for x in _RESPONSE_LENGTHS.value.split(",")]
    return np.resize(np.asarray(given), count)
  data = rl_data.build(settings_lib.from_config(config))
  return np.array([len(data.tokenizer.encode(data.train_records[i]["solution"])) + 1
                   for i in range(count)])


def bench_rollouts(dtypes, slot_counts):
  """Static (every response in its own slot, prefilled alone) vs continuous batching
  (`slot_counts`, one prefill per prompt) on one RL step's length distribution."""
  config = _ROLLOUT_CONFIG.value
  m = config.rl.prompts_per_step * config.rl.group_size
  lengths = response_lengths(config, m)
  print(f"\nRL-step rollouts ({m} responses of {lengths.min()}-{lengths.max()} tokens, median "
        f"{np.median(lengths):.0f}, mean {lengths.mean():.1f}; median of {_REPEATS.value})")
  engines = {f"{spec}/{'static' if s == 0 else f'slots{s}'}": _Rollouts(config, spec, s, lengths)
             for spec in dtypes for s in [0, *slot_counts]}
  steps = {name: e.run() for name, e in engines.items()}  # compile
  for e in engines.values():
    e.seconds.clear()
  _alternate(engines, _Rollouts.run)
  print(f"{'engine':<20}{'slots':>6}{'steps':>7}{'wasted':>8}{'seconds':>9}{'useful tok/s':>14}"
        f"{'vs static':>11}")
  rows = {}
  for name, e in engines.items():
    r = rows[name] = e.figures(steps[name])
    static = rows[name.split("/")[0] + "/static"]
    r["speedup_vs_static"] = static["seconds"] / r["seconds"]
    print(f"{name:<20}{e.slots:>6}{r['decode_steps']:>7}{r['wasted_frac']:>8.1%}"
          f"{r['seconds']:>9.3f}{r['useful_tok_s']:>14.0f}{r['speedup_vs_static']:>10.2f}x")
  return dict(responses=m, length_median=float(np.median(lengths)),
              length_max=int(lengths.max()), rows=rows)


def bench_decode():
  """The decode section (module docstring): a dict for the JSON line."""
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
      if _PREVIOUS.value or _FULL.value:
        engines[f"{spec}/b{b}/previous"] = _Engine(params, spec, b, previous_cfg,
                                                   scan_layers=True)
  for e in engines.values():  # compile
    jax.block_until_ready(e.generate().tokens)
  _alternate(engines, _Engine.time_decode)
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
      first.qparams, rollout.tokens, rollout.attn_mask, first.rng,
      model_cfg=first.configs["model_cfg"], sampler_cfg=first.scfg), _REPEATS.value)
  kv_speedup = no_cache_s / (rows[headline]["step_ms"] / 1e3)
  print(f"KV cache: a decode step {rows[headline]['step_ms']:.2f} ms vs {no_cache_s * 1e3:.1f} ms "
        f"without a cache (forward over all {rollout.tokens.shape[1]} positions): "
        f"{kv_speedup:.1f}x ({headline})")
  lengths = list(map(int, _LENGTHS.value))
  compilations = _count_compilations(params, cfg, lengths)
  print(f"prompt lengths {lengths}, prompt_bucket 16: {compilations} compilations "
        "(each one prefill + one decode program)")
  out = {"engine": headline,
         "decode_tok_s": round(rows[headline]["decode_tok_s"], 1),
         "bandwidth_fraction": round(rows[headline]["bandwidth_fraction"], 4),
         "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
         "kv_cache_step_speedup": round(kv_speedup, 2),
         "compilations": compilations, "prompt_lengths_tried": lengths,
         "rows": {k: {f: round(v, 4) for f, v in r.items()} for k, r in rows.items()}}
  if _PREVIOUS.value or _FULL.value:
    out["speedup_vs_previous"] = {
        k: round(r["decode_tok_s"] / rows[f"{k}/previous"]["decode_tok_s"], 3)
        for k, r in rows.items() if not k.endswith("previous")}
  return out


def main(argv):
  del argv
  out = {} if _ONLY_ROLLOUTS.value else bench_decode()
  out["rollouts"] = bench_rollouts(_ROLLOUT_DTYPES.value, list(map(int, _SLOTS.value)))
  print(json.dumps(out))


if __name__ == "__main__":
  errors.run(main)
