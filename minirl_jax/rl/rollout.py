"""The inference side of an RL step: sample responses, score them, measure accuracy.

Plain functions over explicit arguments; `rl.wiring.bind` closes them over a run's settings
once. Batches are global `jax.Array`s sharded over the mesh's batch axes; each process
decodes and scores only the rows it holds.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import sharding
from minirl_jax.data import scoring
from minirl_jax.data import tokenizer as tokenizer_lib
from minirl_jax.models.config import ModelConfig
from minirl_jax.sampling import sampler
from minirl_jax.sampling.config import SamplerConfig

# Evaluation batches have one fixed size, so evaluation compiles the sampler once.
EVAL_BATCH = 128


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows (leading axis) of a batch-sharded global array that this process holds, in
  order: on one process, the whole array."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def to_global(local: np.ndarray, mesh) -> jax.Array:
  """This process's rows of a batch as one batch-sharded global array."""
  return jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, np.ndim(local)), np.asarray(local))


def sample(sampler_params, prompts: dict, key: jax.Array, *, group_size: int,
           model_cfg: ModelConfig, sampler_cfg: SamplerConfig, mesh) -> sampler.Rollout:
  """Generates `group_size` responses per prompt; a prompt's group is contiguous.

  Args:
    sampler_params: `quantize.for_sampler(params, sampler_cfg, axes)`.
    prompts: this process's rows of a prompt batch (`prompt_tokens` left-padded,
      `prompt_mask`), as the grain pipelines yield them.
    key: sampling key; the same key gives the same rollout (at any `sampler.slots`).
    group_size: G, responses per prompt (each prompt is prefilled once for its G where
      the mesh's batch shards divide the prompts).
    model_cfg, sampler_cfg: the trainer's model and the inference engine's settings.
    mesh: the run's mesh; each of its batch shards schedules its own rows.

  Returns:
    A Rollout of B * G rows.
  """
  tokens, lengths = prompts["prompt_tokens"], prompts["prompt_mask"].sum(axis=1)
  shards = sharding.batch_size_multiple(mesh)
  if len(tokens) * jax.process_count() % shards:
    # Each batch shard prefills its own prompts: where the prompts do not split over the
    # shards, every response gets its own copy of its prompt (the same rollout, tested).
    tokens, lengths = (np.repeat(x, group_size, axis=0) for x in (tokens, lengths))
    group_size = 1
  generate = sharding.on_mesh(mesh, sampler.generate)
  return generate(sampler_params, to_global(tokens, mesh), to_global(lengths, mesh), key,
                  model_cfg=model_cfg, sampler_cfg=sampler_cfg, group_size=group_size,
                  shards=shards)


def completions(rollout: sampler.Rollout, tokenizer, eos_ids) -> list[str]:
  """This process's completions as text, cut at the first EOS."""
  tokens, mask = local_rows(rollout.tokens), local_rows(rollout.completion_mask) > 0
  return [tokenizer.decode(tokenizer_lib.trim_at_eos(row[m], eos_ids))
          for row, m in zip(tokens, mask)]


def score(rollout: sampler.Rollout, prompts: dict, *, group_size: int,
          scorer: scoring.RewardScorer, tokenizer, eos_ids, mesh,
          streak: Optional[scoring.ErrorStreak] = None):
  """Rewards R(x, y) of every response.

  Args:
    streak: given on training steps only: told how many of the global batch's calls failed,
      it raises `errors.RunStopped` when most fail step after step. Evaluation passes None.

  Returns:
    (rewards [B * G] global float32 array, metrics: `reward/mean`, `reward/std` over the
    global batch, `reward/errors` and `reward/timeouts` counted on this process).
  """
  texts = completions(rollout, tokenizer, eos_ids)
  scored = scorer.score_detailed(list(np.repeat(prompts["prompt"], group_size)), texts,
                                 list(np.repeat(prompts["answer"], group_size)))
  failed = np.array([i in scored.failures for i in range(len(texts))], np.float32)
  rewards = to_global(scored.rewards, mesh)
  stats, num_failed = _reward_stats(rewards, to_global(failed, mesh))
  if streak is not None:  # global counts, so every process stops on the same step
    streak.update(int(num_failed), rewards.shape[0], scored.first_failure())
  return rewards, {**stats, **scored.metrics}


@jax.jit
def _reward_stats(rewards, failed):
  return {"reward/mean": jnp.mean(rewards), "reward/std": jnp.std(rewards)}, jnp.sum(failed)


def evaluate(sampler_params, batches, key: jax.Array, *, samples: int,
             sample_fn: Callable, score_fn: Callable, mesh) -> dict[str, float]:
  """avg@k and pass@k (k = `samples`) over held-out batches (`RunData.eval_batches`).

  Args:
    sampler_params: the sampler's params.
    batches: prompt batches with a `valid` flag per row (padding rows are not counted).
    key: sampling key; batch i samples with fold_in(key, i).
    samples: k, responses per problem.
    sample_fn: `sample` bound to the run's configs (takes group_size=).
    score_fn: `score` bound to the run's scorer (takes group_size=).
    mesh: the run's mesh.
  """
  avg = passed = total = 0.0
  for i, batch in enumerate(batches):
    rollout = sample_fn(sampler_params, batch, jax.random.fold_in(key, i), group_size=samples)
    rewards, _ = score_fn(rollout, batch, group_size=samples)
    rewards = rewards.reshape(-1, samples)
    valid = to_global(batch["valid"].astype(np.float32), mesh)
    avg += float(jnp.sum(rewards.mean(axis=1) * valid))
    passed += float(jnp.sum(rewards.max(axis=1) * valid))
    total += float(jnp.sum(valid))
  return {f"avg@{samples}": avg / total, f"pass@{samples}": passed / total}
