"""KV-cached generation that records its own log-probs (mu) and routed experts (for R3).

`generate` = bucketed left padding (host) -> jitted `prefill` (each distinct prompt through
the model once, every sequence's first token sampled) -> jitted `start` (the slots' empty
cache, the first sequences placed) -> jitted `decode`: one `lax.while_loop` over a fixed
number of slots; a slot whose sequence has ended takes the next waiting sequence (its
prompt's cached keys copied in, `_copy_prompts`), so no row waits for the longest.
Sequence j samples its i-th token with `fold_in(fold_in(rng, j), i)`: the rollout does not
depend on which slot or refill round ran it (docs/sampling.md).
"""
import collections
import dataclasses
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax import errors
from minirl_jax.models import transformer
from minirl_jax.models.config import ModelConfig
from minirl_jax.sampling import quantize
from minirl_jax.sampling.config import SamplerConfig

# Traces (= compilations) of the jitted programs, per name; read by the benchmark.
TRACES = collections.Counter()


@flax.struct.dataclass
class Rollout:
  """What the inference engine hands the trainer. T = bucketed prompt + max_new_tokens.

  `mu_logp[b, t]` is log mu(tokens[b, t] | tokens[b, :t]) under the sampler's own model at
  temperature 1 before top-p/top-k (the paper's mu_theta_old), aligned like
  `transformer.token_logp`; `sample_logp` is the same under the processed distribution the
  token was actually drawn from. Both are 0 outside the completion.
  """
  # int32: left-padded prompt, completion, pad after EOS
  tokens: jax.Array = batch_lib.field("batch", "time")
  attn_mask: jax.Array = batch_lib.field("batch", "time")  # bool: False on padding
  # float32: 1 on sampled tokens up to and including EOS
  completion_mask: jax.Array = batch_lib.field("batch", "time")
  mu_logp: jax.Array = batch_lib.field("batch", "time")      # float32
  sample_logp: jax.Array = batch_lib.field("batch", "time")  # float32
  # routing dtype: experts the sampler ran; -1 elsewhere
  routing_mu: jax.Array = batch_lib.field("layers", "batch", "time", "top_k")
  num_generated: jax.Array = batch_lib.field("batch")  # int32: completion tokens, EOS included


@flax.struct.dataclass
class Prefix:
  """`prefill`'s output: every distinct prompt run once. N prompts, P bucketed width."""
  cache: transformer.KVCache  # [(L,) N, P, G, K]: the prompts' keys and values
  keys: jax.Array             # [M] one sampling key per sequence (M = N x group size)
  limit: jax.Array            # [M] int32: tokens the sequence may sample
  live: jax.Array             # [M] bool: the first token did not end the sequence


@flax.struct.dataclass
class Slots:
  """The decode loop's carry. D shards of C slots each (S = D x C rows decoded at once);
  each shard schedules its own M / D sequences, so no step reads another shard's rows."""
  step: jax.Array       # [] int32: decode steps run
  seq: jax.Array        # [D, C] int32: the shard-local sequence in each slot, -1 when free
  pos: jax.Array        # [D, C] int32: tokens the slot's sequence has sampled
  queue: jax.Array      # [D, M / D] int32: live sequences in the order slots take them
  waiting: jax.Array    # [D] int32: index into `queue` of the next sequence to start
  num_live: jax.Array   # [D] int32: live sequences per shard (the queue's valid prefix)
  cache: transformer.KVCache  # [(L,) S, P + n - 1, G, K], write slot per row
  rollout: Rollout      # every field as in the Rollout, rows [M], filled as sequences run


def engine_config(model_cfg: ModelConfig, sampler_cfg: SamplerConfig) -> ModelConfig:
  """The model config the sampler runs: the sampler's activation dtype, and no MoE dense
  pass for W8A8 weights (int8, fp8). Their 8-bit dots are the costly part on XLA:CPU and
  the blocks kernel gathers only a quarter of float32's bytes, so the grouped kernel
  stays faster there (0.84x with the dense pass at configs/bench.py, batch 16)."""
  cfg = dataclasses.replace(model_cfg, compute_dtype=sampler_cfg.compute_dtype)
  if quantize.is_w8a8(sampler_cfg.dtype):
    cfg = dataclasses.replace(cfg, moe_dense_max_group=0)
  return cfg


def process_logits(logits_BV: jax.Array, sampler_cfg: SamplerConfig) -> jax.Array:
  """Temperature, then top-k, then top-p: removed tokens get -inf."""
  x_BV = logits_BV.astype(jnp.float32) / sampler_cfg.temperature
  if sampler_cfg.top_k and sampler_cfg.top_k < x_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(x_BV, sampler_cfg.top_k)[0][:, -1:]
    x_BV = jnp.where(x_BV >= kth_B1, x_BV, -jnp.inf)
  if sampler_cfg.top_p < 1:
    sorted_BV = -jnp.sort(-x_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < sampler_cfg.top_p
    last_B1 = jnp.sum(keep_BV, axis=-1, keepdims=True) - 1
    threshold_B1 = jnp.take_along_axis(sorted_BV, last_B1, axis=-1)
    x_BV = jnp.where(x_BV >= threshold_B1, x_BV, -jnp.inf)
  return x_BV


def sample_token(logits_BV: jax.Array, keys_B: jax.Array, sampler_cfg: SamplerConfig):
  """Draws one token per row, row b with its own key `keys_B[b]`.

  Returns:
    (tokens_B int32, mu_logp_B: log-prob at temperature 1 before truncation,
     sample_logp_B: log-prob under the processed distribution; 0 when greedy).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if sampler_cfg.logit_noise:
    # Its own stream of each row's key: the token draw is left as it was.
    noise_BV = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1),
                                                    logits_BV.shape[-1:]))(keys_B)
    logits_BV = logits_BV + sampler_cfg.logit_noise * noise_BV
  mu_all_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  if sampler_cfg.greedy:
    tokens_B = jnp.argmax(logits_BV, axis=-1)
    sample_logp_B = jnp.zeros(tokens_B.shape, jnp.float32)
  else:
    processed_BV = process_logits(logits_BV, sampler_cfg)
    tokens_B = jax.vmap(jax.random.categorical)(keys_B, processed_BV)
    sample_all_BV = jax.nn.log_softmax(processed_BV, axis=-1)
    sample_logp_B = jnp.take_along_axis(sample_all_BV, tokens_B[:, None], axis=-1)[:, 0]
  mu_logp_B = jnp.take_along_axis(mu_all_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B.astype(jnp.int32), mu_logp_B, sample_logp_B


def token_keys(sequence_keys_B: jax.Array, index_B: jax.Array) -> jax.Array:
  """The key sequence b draws its token number `index_B[b]` (0 = the first) with."""
  return jax.vmap(jax.random.fold_in)(sequence_keys_B, index_B)


def _is_eos(tokens_B, sampler_cfg: SamplerConfig):
  return jnp.isin(tokens_B, jnp.asarray(sampler_cfg.eos_ids, jnp.int32))


def prefill(params, tokens_NP, prompt_mask_NP, rng, limits_M=None, *, group_size: int,
            model_cfg: ModelConfig, sampler_cfg: SamplerConfig) -> tuple[Prefix, Rollout]:
  """Runs each left-padded prompt through the model once and samples the first token of
  its `group_size` sequences (sequence j = n * group_size + g is sample g of prompt n).
  `limits_M` caps each sequence's tokens below max_new_tokens (None: no cap).

  Returns:
    (Prefix, a Rollout of M = N x group_size rows holding the prompts, their routing and
    the first tokens).
  """
  TRACES["prefill"] += 1
  cfg = engine_config(model_cfg, sampler_cfg)
  n, p = tokens_NP.shape
  m, new = n * group_size, sampler_cfg.max_new_tokens
  cache = transformer.init_kv_cache(cfg, n, p, sampler_cfg.kv_cache_dtype)
  if transformer.is_per_layer(params):  # the cache follows the weights' form
    cache = transformer.unstack_layers(cache)
  logits_NPV, aux = transformer.forward(params, tokens_NP, cfg=cfg, attn_mask_BT=prompt_mask_NP,
                                        kv_cache=cache)
  repeat = functools.partial(jnp.repeat, repeats=group_size, axis=0, total_repeat_length=m)
  keys_M = jax.vmap(functools.partial(jax.random.fold_in, rng))(jnp.arange(m))
  first_M, mu_M, sample_M = sample_token(repeat(logits_NPV[:, -1]),
                                         token_keys(keys_M, jnp.zeros(m, jnp.int32)),
                                         sampler_cfg)
  mask_MP = repeat(prompt_mask_NP)
  # Pads get -1 (route live): the trainer's experts at a pad position never matter.
  routing_LMPk = jnp.where(mask_MP[None, :, :, None], jnp.repeat(aux.routing, group_size, 1), -1)

  def first_column(prompt_MP, first_M, fill=0):
    """The prompt, then the first token at column P, then `fill` up to T."""
    out_MT = jnp.pad(prompt_MP, ((0, 0), (0, new)), constant_values=fill)
    return out_MT.at[:, p].set(first_M.astype(out_MT.dtype))
  zeros_MP = jnp.zeros((m, p), jnp.float32)
  prompt_MP = jnp.where(mask_MP, repeat(tokens_NP), sampler_cfg.pad_id).astype(jnp.int32)
  rollout = Rollout(
      tokens=first_column(prompt_MP, first_M, sampler_cfg.pad_id),
      attn_mask=first_column(mask_MP, jnp.ones(m, bool)),
      completion_mask=first_column(zeros_MP, jnp.ones(m)), mu_logp=first_column(zeros_MP, mu_M),
      sample_logp=first_column(zeros_MP, sample_M),
      routing_mu=jnp.pad(routing_LMPk, ((0, 0), (0, 0), (0, new), (0, 0)), constant_values=-1),
      num_generated=jnp.ones(m, jnp.int32))
  limit_M = jnp.full(m, new, jnp.int32) if limits_M is None else jnp.clip(limits_M, 1, new)
  live_M = ~_is_eos(first_M, sampler_cfg) & (limit_M > 1)
  return Prefix(cache=aux.kv_cache.replace(end=None), keys=keys_M, limit=limit_M,
                live=live_M), rollout


def _shard(x, d, axis=0):
  return x.reshape(*x.shape[:axis], d, x.shape[axis] // d, *x.shape[axis + 1:])


def _unshard(x, axis=0):
  return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


_CACHE_ARRAYS = ("k_LBSGK", "v_LBSGK", "k_scale_LBSG1", "v_scale_LBSG1")


def _copy_prompts(cache, prefix_cache, taken_DC, prompt_DC):
  """The prompts' keys and values copied into the slots that take a new sequence (slot c of
  shard d takes shard-local prompt `prompt_DC[d, c]` where `taken_DC`); the rest of those
  rows becomes invalid, so nothing of the slot's previous sequence is seen again."""
  d, c = taken_DC.shape
  p = prefix_cache.valid_BS.shape[1]

  def copy(slots, prompts, axis):
    slots, prompts = _shard(slots, d, axis), _shard(prompts, d, axis)
    slots, prompts = jnp.moveaxis(slots, (axis, axis + 1), (0, 1)), jnp.moveaxis(
        prompts, (axis, axis + 1), (0, 1))

    def one_shard(slots_C, prompts_N, taken_C, prompt_C):
      rows = jnp.where(taken_C, jnp.arange(c), c)  # c: out of range, dropped
      return slots_C.at[rows, ..., :p, :, :].set(prompts_N[prompt_C], mode="drop")
    out = jax.vmap(one_shard)(slots, prompts, taken_DC, prompt_DC)
    return _unshard(jnp.moveaxis(out, (0, 1), (axis, axis + 1)), axis)

  def copy_layers(slots, prompts):  # per-layer tuples of [B, ...], or stacked [L, B, ...]
    if isinstance(slots, tuple):
      return tuple(copy(s, q, 0) for s, q in zip(slots, prompts))
    return copy(slots, prompts, 1)
  fields = {f: copy_layers(getattr(cache, f), getattr(prefix_cache, f))
            for f in _CACHE_ARRAYS if getattr(cache, f) is not None}
  valid_DCS = _shard(cache.valid_BS, d)
  prompt_valid_DCP = jax.vmap(lambda v, i: v[i])(_shard(prefix_cache.valid_BS, d), prompt_DC)
  fresh_DCS = jnp.pad(prompt_valid_DCP, ((0, 0), (0, 0), (0, valid_DCS.shape[-1] - p)))
  valid_BS = _unshard(jnp.where(taken_DC[..., None], fresh_DCS, valid_DCS))
  return cache.replace(valid_BS=valid_BS, **fields)


def _refill(state: Slots, prefix: Prefix, group_size: int) -> Slots:
  """Every free slot takes the next waiting sequence of its shard, slots in order."""
  free_DC = state.seq < 0
  index_DC = state.waiting[:, None] + jnp.cumsum(free_DC, axis=1) - 1
  taken_DC = free_DC & (index_DC < state.num_live[:, None])
  safe_DC = jnp.minimum(index_DC, state.queue.shape[1] - 1)
  new_DC = jnp.take_along_axis(state.queue, safe_DC, axis=1)
  cache = jax.lax.cond(jnp.any(taken_DC), _copy_prompts, lambda c, *_: c, state.cache,
                       prefix.cache, taken_DC, new_DC // group_size)
  return state.replace(
      seq=jnp.where(taken_DC, new_DC, state.seq), pos=jnp.where(taken_DC, 1, state.pos),
      waiting=state.waiting + jnp.sum(taken_DC, axis=1), cache=cache)


def _scatter(x_DM, seq_DC, value_DC, column: Optional[jax.Array] = None):
  """Writes `value_DC` at row `seq_DC` (column `column_DC`) of each shard; rows < 0 skip."""
  rows = jnp.where(seq_DC >= 0, seq_DC, x_DM.shape[1])

  def one(x, r, v, *col):
    return x.at[(r, *col)].set(v.astype(x.dtype), mode="drop")
  return jax.vmap(one)(x_DM, rows, value_DC, *(() if column is None else (column,)))


def start(prefix: Prefix, rollout: Rollout, *, slots: int, shards: int,
          group_size: int, order: Optional[jax.Array] = None, model_cfg: ModelConfig,
          sampler_cfg: SamplerConfig) -> Slots:
  """The decode loop's first carry: an empty cache of `slots` rows, filled from the queue.

  Args:
    order: [M] a permutation of the sequences: the order slots take them in, within each
      shard (a test's hook; the rollout does not depend on it). Default: index order.
  """
  cfg = engine_config(model_cfg, sampler_cfg)
  m = rollout.tokens.shape[0]
  p = prefix.cache.valid_BS.shape[1]
  cache = transformer.init_kv_cache(cfg, slots, p + sampler_cfg.max_new_tokens - 1,
                                    sampler_cfg.kv_cache_dtype)
  if isinstance(prefix.cache.k_LBSGK, tuple):
    cache = transformer.unstack_layers(cache)
  order_DM = _shard(jnp.arange(m) if order is None else order, shards)
  local_DM = order_DM % (m // shards)  # shard-local sequence indices
  live_DM = jnp.take_along_axis(_shard(prefix.live, shards), local_DM, axis=1)
  queue = jnp.take_along_axis(local_DM, jnp.argsort(~live_DM, axis=1, stable=True), axis=1)
  state = Slots(step=jnp.zeros((), jnp.int32),
                seq=jnp.full((shards, slots // shards), -1, jnp.int32),
                pos=jnp.zeros((shards, slots // shards), jnp.int32), queue=queue,
                waiting=jnp.zeros(shards, jnp.int32),
                num_live=jnp.sum(live_DM, axis=1, dtype=jnp.int32), cache=cache,
                rollout=rollout)
  return _refill(state, prefix, group_size)


def decode_step(params, state: Slots, prefix: Prefix, *, group_size: int,
                model_cfg: ModelConfig, sampler_cfg: SamplerConfig) -> Slots:
  """Runs every busy slot's last token through the model and samples its next; slots
  whose sequence ended take the next waiting one."""
  cfg = engine_config(model_cfg, sampler_cfg)
  d, c = state.seq.shape
  p = prefix.cache.valid_BS.shape[1]
  busy_DC = state.seq >= 0
  seq_DC = jnp.where(busy_DC, state.seq, 0)
  by_shard = lambda x: _shard(x, d)
  tokens_DMT = by_shard(state.rollout.tokens)
  at_DC = p + state.pos - 1  # where the last sampled token sits
  last_DC = jax.vmap(lambda t, s, a: t[s, a])(tokens_DMT, seq_DC, at_DC)
  cache = state.cache.replace(end=_unshard(at_DC))
  logits_S1V, aux = transformer.forward(params, _unshard(last_DC)[:, None], cfg=cfg,
                                        attn_mask_BT=_unshard(busy_DC)[:, None], kv_cache=cache)
  routing_LDCk = _shard(aux.routing[:, :, 0], d, axis=1)
  routing = jax.vmap(
      lambda r, s, a, v: _scatter(r, s, v, a), in_axes=(0, None, None, 0))(
          _shard(state.rollout.routing_mu, d, axis=1), jnp.where(busy_DC, state.seq, -1),
          at_DC, routing_LDCk)

  keys_DC, limit_DC = (jax.vmap(lambda x, i: x[i])(_shard(x, d), seq_DC)
                       for x in (prefix.keys, prefix.limit))
  tokens, mu, sample = sample_token(
      logits_S1V[:, 0], token_keys(_unshard(keys_DC), _unshard(state.pos)), sampler_cfg)
  tokens_DC, mu_DC, sample_DC = (by_shard(x) for x in (tokens, mu, sample))
  seq_or_free = jnp.where(busy_DC, state.seq, -1)
  column_DC = p + state.pos
  r = state.rollout
  put = lambda x, v: _unshard(_scatter(by_shard(x), seq_or_free, v, column_DC))
  pos_DC = state.pos + busy_DC
  rollout = r.replace(
      tokens=put(r.tokens, tokens_DC), attn_mask=put(r.attn_mask, busy_DC),
      completion_mask=put(r.completion_mask, busy_DC), mu_logp=put(r.mu_logp, mu_DC),
      sample_logp=put(r.sample_logp, sample_DC), routing_mu=_unshard(routing, axis=1),
      num_generated=_unshard(_scatter(by_shard(r.num_generated), seq_or_free, pos_DC)))
  ended_DC = busy_DC & (_is_eos(tokens_DC, sampler_cfg) | (pos_DC >= limit_DC))
  state = state.replace(step=state.step + 1, seq=jnp.where(ended_DC, -1, state.seq), pos=pos_DC,
                        cache=aux.kv_cache.replace(end=state.cache.end), rollout=rollout)
  return _refill(state, prefix, group_size)


def decode(params, state: Slots, prefix: Prefix, *, group_size: int, model_cfg: ModelConfig,
           sampler_cfg: SamplerConfig) -> Slots:
  """Decodes until every sequence has sampled an EOS or max_new_tokens."""
  TRACES["decode"] += 1
  body = functools.partial(decode_step, params, prefix=prefix, group_size=group_size,
                           model_cfg=model_cfg, sampler_cfg=sampler_cfg)
  return jax.lax.while_loop(lambda s: jnp.any(s.seq >= 0), body, state)


_CONFIGS = ("model_cfg", "sampler_cfg", "group_size")
prefill_jit = jax.jit(prefill, static_argnames=_CONFIGS)
start_jit = jax.jit(start, static_argnames=_CONFIGS + ("slots", "shards"),
                    donate_argnames="rollout")
decode_jit = jax.jit(decode, static_argnames=_CONFIGS, donate_argnames="state")


def bucket_prompts(prompt_tokens_BP, prompt_lengths_B, sampler_cfg: SamplerConfig):
  """Left-pads prompts to a multiple of `prompt_bucket`; returns (tokens, mask)."""
  p = prompt_tokens_BP.shape[1]
  bucketed = -(-p // sampler_cfg.prompt_bucket) * sampler_cfg.prompt_bucket
  tokens_BP = jnp.pad(jnp.asarray(prompt_tokens_BP, jnp.int32), ((0, 0), (bucketed - p, 0)),
                      constant_values=sampler_cfg.pad_id)
  lengths_B1 = jnp.asarray(prompt_lengths_B, jnp.int32)[:, None]
  return tokens_BP, jnp.arange(bucketed)[None, :] >= bucketed - lengths_B1


def _check(params, model_cfg, sampler_cfg):
  found = quantize.describe(params)
  wanted = quantize.options(sampler_cfg, model_cfg.d_model)
  if found != wanted:
    raise errors.UserError(f"sampler.dtype is {sampler_cfg.dtype!r} but the params hold {found} "
                           f"weights, not {wanted}: pass sampling.quantize.for_sampler(params, "
                           "sampler_cfg, axes)")
  bad = [i for i in sampler_cfg.eos_ids + (sampler_cfg.pad_id,) if i >= model_cfg.vocab_size]
  if bad:
    raise errors.UserError(f"sampler.eos_ids/pad_id {bad} must be < model.vocab_size "
                           f"({model_cfg.vocab_size})")


def num_slots(sampler_cfg: SamplerConfig, sequences: int, shards: int = 1) -> int:
  """Rows decoded at once: `sampler.slots` (0: every sequence), at most the sequences,
  rounded down to a multiple of `shards` (each shard decodes as many)."""
  wanted = min(sampler_cfg.slots or sequences, sequences)
  return max(shards, wanted // shards * shards)


def generate(sampler_params, prompt_tokens_NP, prompt_lengths_N, rng, *,
             model_cfg: ModelConfig, sampler_cfg: SamplerConfig, group_size: int = 1,
             shards: int = 1, order: Optional[jax.Array] = None,
             limits: Optional[jax.Array] = None) -> Rollout:
  """Samples `group_size` completions per prompt.

  Args:
    sampler_params: `quantize.for_sampler(params, sampler_cfg, param_axes(model_cfg))`.
    prompt_tokens_NP: int prompts, left-padded: row n's prompt is its last
      `prompt_lengths_N[n]` entries.
    prompt_lengths_N: int prompt lengths (>= 1).
    rng: a `jax.random.key`; the same key gives the same rollout, whatever the slots.
    model_cfg: the trainer's ModelConfig (the sampler sets its own compute dtype).
    sampler_cfg: SamplerConfig (`slots`: rows decoded at once).
    group_size: G, completions per prompt; each prompt is prefilled once for all G.
    shards: the batch is split in this many contiguous parts (the mesh's batch shards),
      each scheduled over its own slots; N and the slots must divide by it.
    order: a permutation of the N x G sequences, the order slots take them in (tests).
    limits: [N x G] int, each sequence's token budget if below max_new_tokens (the
      benchmark's way to impose a length distribution on an untrained model).

  Returns:
    A Rollout of N x G rows (row n * G + g: sample g of prompt n) and T = ceil(P /
    prompt_bucket) * prompt_bucket + max_new_tokens positions.
    `transformer.forward(params, r.tokens, cfg=cfg, attn_mask_BT=r.attn_mask,
    routing=r.routing_mu)` is the trainer's teacher-forced forward under R3.
  """
  _check(sampler_params, model_cfg, sampler_cfg)
  tokens_NP, mask_NP = bucket_prompts(prompt_tokens_NP, prompt_lengths_N, sampler_cfg)
  configs = dict(model_cfg=model_cfg, sampler_cfg=sampler_cfg, group_size=group_size)
  prefix, rollout = prefill_jit(sampler_params, tokens_NP, mask_NP, rng, limits, **configs)
  slots = num_slots(sampler_cfg, rollout.tokens.shape[0], shards)
  state = start_jit(prefix, rollout, slots=slots, shards=shards, order=order,
                    **configs)
  return decode_jit(sampler_params, state, prefix, **configs).rollout
