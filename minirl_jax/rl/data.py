"""What a run reads: tokenizer, training and held-out records, reward, and the iterators."""
import dataclasses
import importlib
from typing import Any, Callable, Optional

from minirl_jax import errors
from minirl_jax.data import hf_tokenizer
from minirl_jax.data import pipeline
from minirl_jax.data import rewards as rewards_lib
from minirl_jax.data import sources
from minirl_jax.data import tasks
from minirl_jax.data import tokenizer as tokenizer_lib
from minirl_jax.rl import settings as settings_lib


@dataclasses.dataclass
class RunData:
  """Records, tokenizer and reward of one run."""
  tokenizer: Any
  train_records: Any            # sequence of {prompt, answer, solution?}
  eval_records: list            # the fixed held-out split
  reward_fn: Callable[[str, str, str], float]
  format_prompt: Optional[Callable[[str], str]]
  max_solution_tokens: Optional[int]  # known bound (synthetic task), else checked per record

  def sft_iterator(self, s: settings_lib.Settings):
    if s.sft.max_steps and "solution" not in self.train_records[0]:
      raise errors.UserError("sft.max_steps > 0 needs a 'solution' field in every data.path row; "
                             "set --config.sft.max_steps=0 to start RL from the initial weights")
    if self.max_solution_tokens is not None and (
        self.max_solution_tokens + 1 > s.sampler.max_new_tokens):
      raise errors.UserError(f"sampler.max_new_tokens ({s.sampler.max_new_tokens}) is shorter than "
                             f"the longest worked solution + EOS ({self.max_solution_tokens + 1})")
    return iter(pipeline.sft_dataset(
        self.train_records, self.tokenizer, global_batch_size=s.sft.batch_size,
        max_prompt_len=s.data.max_prompt_len,
        max_len=s.data.max_prompt_len + s.sampler.max_new_tokens, seed=s.seed,
        format_prompt=self.format_prompt, check_lengths=self.max_solution_tokens is None))

  def rl_iterator(self, s: settings_lib.Settings):
    return iter(pipeline.rl_prompt_dataset(
        self.train_records, self.tokenizer, global_batch_size=s.rl.prompts_per_step,
        max_prompt_len=s.data.max_prompt_len, seed=s.seed + 1,
        format_prompt=self.format_prompt, check_lengths=self.max_solution_tokens is None))

  def eval_batches(self, s: settings_lib.Settings, size: int, batch_size: int):
    """The first `size` held-out problems in fixed batches (last one padded, `valid`)."""
    records = self.eval_records[:size]
    return pipeline.eval_prompt_dataset(
        records, self.tokenizer, global_batch_size=min(batch_size, len(records)),
        max_prompt_len=s.data.max_prompt_len, format_prompt=self.format_prompt)


def load_reward(name: str) -> Callable[[str, str, str], float]:
  """Imports a user reward `package.module:function` (picklable: it runs in workers)."""
  module_name, sep, attr = name.partition(":")
  if not sep or not module_name or not attr:
    raise errors.UserError(f"data.reward must look like 'package.module:function', got {name!r}")
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise errors.UserError(f"data.reward {name!r} cannot be imported: {e}") from e
  if not callable(fn):
    raise errors.UserError(f"data.reward {name!r} is not callable")
  return fn


def build(s: settings_lib.Settings, tokenizer=None) -> RunData:
  """Loads (real) or generates (synthetic) the data the settings name, validating it.

  Args:
    s: the run's settings.
    tokenizer: the one `settings.from_config` used, to avoid loading it twice; default:
      loaded from `s.data.tokenizer`.
  """
  data = _build(s, tokenizer or tokenizer_lib.load(s.data.tokenizer))
  if s.data.reward:
    data.reward_fn = load_reward(s.data.reward)
  return data


def _build(s: settings_lib.Settings, tokenizer) -> RunData:
  cfg = s.data
  eval_size = max(cfg.eval_size, s.sft.eval_size, cfg.full_eval_size)
  if cfg.path:
    if not cfg.tokenizer:
      raise errors.UserError("data.tokenizer must name a tokenizer.json when data.path is set")
    return RunData(tokenizer=tokenizer, train_records=sources.load_records(cfg.path),
                   eval_records=sources.load_records(cfg.eval_path)[:eval_size],
                   reward_fn=rewards_lib.math_reward,
                   format_prompt=hf_tokenizer.math_chat_prompt, max_solution_tokens=None)
  task = cfg.make_task()
  # The chain task checks every step, not just the final number.
  reward_fn = task.reward if cfg.task == "chain" else rewards_lib.exact_match
  if task.max_prompt_chars > cfg.max_prompt_len:
    raise errors.UserError(f"data.max_prompt_len ({cfg.max_prompt_len}) is shorter than the "
                           f"task's longest prompt ({task.max_prompt_chars} tokens)")
  return RunData(tokenizer=tokenizer, train_records=tasks.TrainSource(task, seed=s.seed),
                 eval_records=tasks.heldout_records(task, eval_size),
                 reward_fn=reward_fn, format_prompt=None,
                 max_solution_tokens=task.max_solution_chars)
