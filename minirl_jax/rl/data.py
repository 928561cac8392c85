"""What the loop needs from data: tokenizer, records, iterators, sampling, scoring, eval."""
import dataclasses
import importlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import sharding
from minirl_jax.data import hf_tokenizer
from minirl_jax.data import pipeline
from minirl_jax.data import rewards as rewards_lib
from minirl_jax.data import scoring
from minirl_jax.data import sources
from minirl_jax.data import tasks
from minirl_jax.data import tokenizer as tokenizer_lib
from minirl_jax.sampling import sampler

# Evaluation batches have one fixed size, so evaluation compiles the sampler once.
EVAL_BATCH = 128


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows (leading axis) of a batch-sharded global array that this process holds, in
  order: on one process, the whole array. Each process scores its own rows."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def to_global(local: np.ndarray, mesh) -> jax.Array:
  """This process's rows of a batch as one batch-sharded global array."""
  return jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, np.ndim(local)), np.asarray(local))


@dataclasses.dataclass
class RunData:
  """Records, tokenizer and reward of one run."""
  tokenizer: Any
  train_records: Any            # sequence of {prompt, answer, solution?}
  eval_records: list            # the fixed held-out split
  reward_fn: Callable[[str, str, str], float]
  format_prompt: Optional[Callable[[str], str]]
  max_solution_tokens: Optional[int]  # known bound (synthetic task), else checked per record
  scorer: Optional[scoring.RewardScorer] = None

  def sft_iterator(self, s):
    if s.sft.max_steps and "solution" not in self.train_records[0]:
      raise ValueError("sft.max_steps > 0 needs a 'solution' field in every data.path row; "
                       "set --config.sft.max_steps=0 to start RL from the initial weights")
    self._check_solution_fits(s)
    return iter(pipeline.sft_dataset(
        self.train_records, self.tokenizer, global_batch_size=s.sft.batch_size,
        max_prompt_len=s.data.max_prompt_len,
        max_len=s.data.max_prompt_len + s.sampler.max_new_tokens, seed=s.seed,
        format_prompt=self.format_prompt, check_lengths=self.max_solution_tokens is None))

  def rl_iterator(self, s):
    return iter(pipeline.rl_prompt_dataset(
        self.train_records, self.tokenizer, global_batch_size=s.rl.prompts_per_step,
        max_prompt_len=s.data.max_prompt_len, seed=s.seed + 1,
        format_prompt=self.format_prompt, check_lengths=self.max_solution_tokens is None))

  def _check_solution_fits(self, s):
    if self.max_solution_tokens is not None and (
        self.max_solution_tokens + 1 > s.sampler.max_new_tokens):
      raise ValueError(f"sampler.max_new_tokens ({s.sampler.max_new_tokens}) is shorter than "
                       f"the longest worked solution + EOS ({self.max_solution_tokens + 1})")

  def sample(self, sampler_params, prompts, key, s, mesh, group_size=None):
    """Generates `group_size` responses per prompt; a prompt's group is contiguous."""
    g = s.rl.group_size if group_size is None else group_size
    tokens = to_global(np.repeat(prompts["prompt_tokens"], g, axis=0), mesh)
    lengths = to_global(np.repeat(prompts["prompt_mask"].sum(axis=1), g, axis=0), mesh)
    return sampler.generate(sampler_params, tokens, lengths, key, model_cfg=s.model,
                            sampler_cfg=s.sampler)

  def completions(self, rollout, s) -> list[str]:
    """This process's completions as text, cut at the first EOS."""
    tokens, mask = local_rows(rollout.tokens), local_rows(rollout.completion_mask) > 0
    return [self.tokenizer.decode(tokenizer_lib.trim_at_eos(row[m], s.sampler.eos_ids))
            for row, m in zip(tokens, mask)]

  def score(self, rollout, prompts, s, mesh, group_size=None):
    """Rewards [B*G] as a global array, and counts of reward errors/timeouts."""
    g = s.rl.group_size if group_size is None else group_size
    if self.scorer is None:
      self.scorer = scoring.RewardScorer(self.reward_fn,
                                             timeout_s=s.data.reward_timeout_s)
    texts = self.completions(rollout, s)
    rewards, counts = self.scorer.score(list(np.repeat(prompts["prompt"], g)), texts,
                                        list(np.repeat(prompts["answer"], g)))
    return to_global(rewards, mesh), counts

  def evaluate(self, sampler_params, *, size, key, s, mesh, samples=1) -> dict[str, float]:
    """avg@k and pass@k (k = `samples` at the sampler's temperature) on `size` held-out
    problems."""
    records = self.eval_records[:size]
    batches = pipeline.eval_prompt_dataset(
        records, self.tokenizer, global_batch_size=min(EVAL_BATCH, len(records)),
        max_prompt_len=s.data.max_prompt_len, format_prompt=self.format_prompt)
    avg = passed = total = 0.0
    for i, batch in enumerate(batches):
      rollout = self.sample(sampler_params, batch, jax.random.fold_in(key, i), s, mesh,
                            group_size=samples)
      rewards, _ = self.score(rollout, batch, s, mesh, group_size=samples)
      rewards = rewards.reshape(-1, samples)
      valid = to_global(batch["valid"].astype(np.float32), mesh)
      avg += float(jnp.sum(rewards.mean(axis=1) * valid))
      passed += float(jnp.sum(rewards.max(axis=1) * valid))
      total += float(jnp.sum(valid))
    return {f"avg@{samples}": avg / total, f"pass@{samples}": passed / total}

  def close(self):
    if self.scorer is not None:
      self.scorer.close()


def load_reward(name: str) -> Callable[[str, str, str], float]:
  """Imports a user reward `package.module:function` (picklable: it runs in workers)."""
  module_name, sep, attr = name.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"data.reward must look like 'package.module:function', got {name!r}")
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"data.reward {name!r} cannot be imported: {e}") from e
  if not callable(fn):
    raise ValueError(f"data.reward {name!r} is not callable")
  return fn


def build(config) -> RunData:
  """Loads (real) or generates (synthetic) the data a config names, validating it."""
  data = _build(config)
  if config.data.reward:
    data.reward_fn = load_reward(config.data.reward)
  return data


def _build(config) -> RunData:
  data = config.data
  eval_size = max(int(data.eval_size), int(config.sft.eval_size))
  if data.path:
    if not data.tokenizer:
      raise ValueError("data.tokenizer must name a tokenizer.json when data.path is set")
    if not data.eval_path:
      raise ValueError("data.eval_path must be set with data.path (held-out accuracy)")
    tok = hf_tokenizer.load_hf_tokenizer(data.tokenizer)
    return RunData(tokenizer=tok, train_records=sources.load_records(data.path),
                   eval_records=sources.load_records(data.eval_path)[:eval_size],
                   reward_fn=rewards_lib.math_reward,
                   format_prompt=hf_tokenizer.math_chat_prompt, max_solution_tokens=None)
  task = tasks.ArithmeticTask(num_operands=data.num_operands, max_value=data.max_value,
                              operators=data.operators)
  if task.max_prompt_chars > data.max_prompt_len:
    raise ValueError(f"data.max_prompt_len ({data.max_prompt_len}) is shorter than the "
                     f"task's longest prompt ({task.max_prompt_chars} tokens)")
  return RunData(tokenizer=tokenizer_lib.CharTokenizer(),
                 train_records=tasks.TrainSource(task, seed=int(config.seed)),
                 eval_records=tasks.heldout_records(task, eval_size),
                 reward_fn=rewards_lib.exact_match, format_prompt=None,
                 max_solution_tokens=task.max_solution_chars)
