"""KV-cached generation that records its own log-probs (mu) and routed experts (for R3).

`generate` = bucketed left padding (host) -> jitted `prefill` (prompt through the model,
first token sampled) -> jitted `decode` (one `lax.while_loop` of `decode_step`, state donated).
"""
import collections
import dataclasses
import functools

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
class DecodeState:
  """The decode loop's carry. P = bucketed prompt length, S = T - 1 cache slots."""
  step: jax.Array             # [] int32: tokens sampled so far; the next goes to P + step
  tokens: jax.Array           # [B, T] int32
  attn_mask: jax.Array        # [B, T] bool
  completion_mask: jax.Array  # [B, T] float32
  mu_logp: jax.Array          # [B, T] float32
  sample_logp: jax.Array      # [B, T] float32
  routing_mu: jax.Array       # [L, B, T, k] routing dtype
  num_generated: jax.Array    # [B] int32
  done: jax.Array             # [B] bool: the row has sampled an EOS
  cache: transformer.KVCache  # [L, B, S, G, K] keys, values (kv_cache_dtype), or per layer
  rng: jax.Array              # key; step i samples with fold_in(rng, i)


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


def sample_token(logits_BV: jax.Array, key: jax.Array, sampler_cfg: SamplerConfig):
  """Draws one token per row.

  Returns:
    (tokens_B int32, mu_logp_B: log-prob at temperature 1 before truncation,
     sample_logp_B: log-prob under the processed distribution; 0 when greedy).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  mu_all_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  if sampler_cfg.greedy:
    tokens_B = jnp.argmax(logits_BV, axis=-1)
    sample_logp_B = jnp.zeros(tokens_B.shape, jnp.float32)
  else:
    processed_BV = process_logits(logits_BV, sampler_cfg)
    tokens_B = jax.random.categorical(key, processed_BV, axis=-1)
    sample_all_BV = jax.nn.log_softmax(processed_BV, axis=-1)
    sample_logp_B = jnp.take_along_axis(sample_all_BV, tokens_B[:, None], axis=-1)[:, 0]
  mu_logp_B = jnp.take_along_axis(mu_all_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B.astype(jnp.int32), mu_logp_B, sample_logp_B


def _set_column(x_BT, column_B, t):
  return jax.lax.dynamic_update_slice_in_dim(x_BT, column_B[:, None].astype(x_BT.dtype), t, 1)


def _sample_into(state: DecodeState, logits_BV, sampler_cfg: SamplerConfig) -> DecodeState:
  """Samples the token at position P + step for every unfinished row."""
  t = state.tokens.shape[1] - sampler_cfg.max_new_tokens + state.step
  tokens_B, mu_B, sample_B = sample_token(logits_BV, jax.random.fold_in(state.rng, state.step),
                                          sampler_cfg)
  alive_B = ~state.done
  tokens_B = jnp.where(alive_B, tokens_B, sampler_cfg.pad_id)
  is_eos_B = jnp.isin(tokens_B, jnp.asarray(sampler_cfg.eos_ids, jnp.int32))
  return state.replace(
      step=state.step + 1,
      tokens=_set_column(state.tokens, tokens_B, t),
      attn_mask=_set_column(state.attn_mask, alive_B, t),
      completion_mask=_set_column(state.completion_mask, alive_B, t),
      mu_logp=_set_column(state.mu_logp, jnp.where(alive_B, mu_B, 0.0), t),
      sample_logp=_set_column(state.sample_logp, jnp.where(alive_B, sample_B, 0.0), t),
      num_generated=state.num_generated + alive_B,
      done=state.done | (alive_B & is_eos_B))


def prefill(params, tokens_BP, prompt_mask_BP, rng, *, model_cfg: ModelConfig,
            sampler_cfg: SamplerConfig) -> DecodeState:
  """Runs the left-padded prompts through the model and samples the first token."""
  TRACES["prefill"] += 1
  cfg = engine_config(model_cfg, sampler_cfg)
  b, p = tokens_BP.shape
  n = sampler_cfg.max_new_tokens
  # The final sampled token never runs through the model: P + n - 1 slots suffice.
  cache = transformer.init_kv_cache(cfg, b, p + n - 1, sampler_cfg.kv_cache_dtype)
  if transformer.is_per_layer(params):  # the cache follows the weights' form
    cache = transformer.unstack_layers(cache)
  logits_BPV, aux = transformer.forward(params, tokens_BP, cfg=cfg, attn_mask_BT=prompt_mask_BP,
                                        kv_cache=cache)
  # Pads get -1 (route live): the trainer's experts at a pad position never matter.
  routing_LBPk = jnp.where(prompt_mask_BP[None, :, :, None], aux.routing, -1)
  prompt_BP = jnp.where(prompt_mask_BP, tokens_BP, sampler_cfg.pad_id).astype(jnp.int32)
  state = DecodeState(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.pad(prompt_BP, ((0, 0), (0, n)), constant_values=sampler_cfg.pad_id),
      attn_mask=jnp.pad(prompt_mask_BP, ((0, 0), (0, n))),
      completion_mask=jnp.zeros((b, p + n), jnp.float32),
      mu_logp=jnp.zeros((b, p + n), jnp.float32),
      sample_logp=jnp.zeros((b, p + n), jnp.float32),
      routing_mu=jnp.pad(routing_LBPk, ((0, 0), (0, 0), (0, n), (0, 0)), constant_values=-1),
      num_generated=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
      cache=aux.kv_cache, rng=rng)
  return _sample_into(state, logits_BPV[:, -1], sampler_cfg)


def decode_step(params, state: DecodeState, *, model_cfg: ModelConfig,
                sampler_cfg: SamplerConfig) -> DecodeState:
  """Runs the last sampled token through the model (cache, routing) and samples the next."""
  cfg = engine_config(model_cfg, sampler_cfg)
  t = state.tokens.shape[1] - sampler_cfg.max_new_tokens + state.step - 1
  column = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=t, slice_size=1, axis=1)
  valid_B1 = column(state.completion_mask) > 0
  logits_B1V, aux = transformer.forward(params, column(state.tokens), cfg=cfg,
                                        attn_mask_BT=valid_B1, kv_cache=state.cache)
  routing_LB1k = jnp.where(valid_B1[None, :, :, None], aux.routing, -1)
  state = state.replace(
      cache=aux.kv_cache,
      routing_mu=jax.lax.dynamic_update_slice_in_dim(state.routing_mu, routing_LB1k, t, 2))
  return _sample_into(state, logits_B1V[:, 0], sampler_cfg)


def decode(params, state: DecodeState, *, model_cfg: ModelConfig,
           sampler_cfg: SamplerConfig) -> DecodeState:
  """Decodes until every row has sampled an EOS or max_new_tokens are sampled."""
  TRACES["decode"] += 1

  def cond(s):
    return (s.step < sampler_cfg.max_new_tokens) & ~jnp.all(s.done)

  body = functools.partial(decode_step, params, model_cfg=model_cfg, sampler_cfg=sampler_cfg)
  return jax.lax.while_loop(cond, body, state)


_CONFIGS = ("model_cfg", "sampler_cfg")
prefill_jit = jax.jit(prefill, static_argnames=_CONFIGS)
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


def generate(sampler_params, prompt_tokens_BP, prompt_lengths_B, rng, *,
             model_cfg: ModelConfig, sampler_cfg: SamplerConfig) -> Rollout:
  """Samples one completion per prompt.

  Args:
    sampler_params: `quantize.for_sampler(params, sampler_cfg, param_axes(model_cfg))`.
    prompt_tokens_BP: int prompts, left-padded: row b's prompt is its last
      `prompt_lengths_B[b]` entries.
    prompt_lengths_B: int prompt lengths (>= 1).
    rng: a `jax.random.key`; the same key gives the same rollout.
    model_cfg: the trainer's ModelConfig (the sampler sets its own compute dtype).
    sampler_cfg: SamplerConfig.

  Returns:
    A Rollout of T = ceil(P / prompt_bucket) * prompt_bucket + max_new_tokens positions.
    `transformer.forward(params, r.tokens, cfg=cfg, attn_mask_BT=r.attn_mask,
    routing=r.routing_mu)` is the trainer's teacher-forced forward under R3.
  """
  _check(sampler_params, model_cfg, sampler_cfg)
  tokens_BP, mask_BP = bucket_prompts(prompt_tokens_BP, prompt_lengths_B, sampler_cfg)
  configs = dict(model_cfg=model_cfg, sampler_cfg=sampler_cfg)
  state = prefill_jit(sampler_params, tokens_BP, mask_BP, rng, **configs)
  return to_rollout(decode_jit(sampler_params, state, **configs))


def to_rollout(state: DecodeState) -> Rollout:
  return Rollout(tokens=state.tokens, attn_mask=state.attn_mask,
                 completion_mask=state.completion_mask, mu_logp=state.mu_logp,
                 sample_logp=state.sample_logp, routing_mu=state.routing_mu,
                 num_generated=state.num_generated)
