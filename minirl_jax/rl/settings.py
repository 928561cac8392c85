"""Turns an experiment ConfigDict into validated, frozen dataclasses before anything compiles.

`from_config` is the only function that reads a ConfigDict: everything after it (the data
builder, `loop.Run`, the RL step functions, the scripts) takes these dataclasses. Defaults
live in one place, `minirl_jax/config_base.py`; these dataclasses have none. Every error
names the offending field (`rl.mini_batch_size ...`).
"""
import dataclasses
import importlib.util
from typing import Mapping, Optional

import numpy as np

from minirl_jax import objectives
from minirl_jax import sections
from minirl_jax.models.config import ModelConfig
from minirl_jax.data import tokenizer as tokenizer_lib
from minirl_jax.sampling.config import SamplerConfig

ROUTING_REPLAY = ("none", "r2", "r3")
SYNTHETIC_TASKS = ("arithmetic", "chain")


_fail = sections.fail


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: Optional[str]
  eval_path: Optional[str]
  task: str  # the synthetic task: "arithmetic" (tasks.ArithmeticTask) or "chain" (chain_task)
  num_operands: int  # arithmetic
  min_steps: int  # chain
  max_steps: int  # chain
  modulus: int  # chain
  max_value: int
  operators: str
  max_prompt_len: int
  eval_size: int
  full_eval_size: int  # 0: no full evaluation (`eval/accuracy_full`)
  tokenizer: Optional[str]
  reward: Optional[str]
  reward_timeout_s: float
  reward_max_error_frac: float

  def __post_init__(self):
    if self.max_prompt_len < 1 or self.eval_size < 1:
      _fail("data.max_prompt_len/eval_size", "must be >= 1")
    if not isinstance(self.full_eval_size, int) or self.full_eval_size < 0:
      _fail("data.full_eval_size", f"must be an integer >= 0, got {self.full_eval_size!r}")
    if self.task not in SYNTHETIC_TASKS:
      _fail("data.task", f"must be one of {SYNTHETIC_TASKS}, got {self.task!r}")
    if not self.reward_timeout_s > 0:
      _fail("data.reward_timeout_s", f"must be > 0, got {self.reward_timeout_s}")
    if not 0 <= self.reward_max_error_frac <= 1:
      _fail("data.reward_max_error_frac", f"must be in [0, 1], got {self.reward_max_error_frac}")
    if self.path and not self.eval_path:
      _fail("data.eval_path", "must be set with data.path (a held-out set to report accuracy on)")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The synchronous loop. N = prompts_per_step * group_size / mini_batch_size updates."""
  steps: int
  prompts_per_step: int
  group_size: int
  mini_batch_size: int
  routing_replay: str
  eval_every: int
  full_eval_steps: tuple[int, ...]  # with data.full_eval_size: `eval/accuracy_full`
  learning_rate: float
  warmup_steps: int
  allow_greedy: bool  # a sampler whose G responses cannot differ is then not an error
  # Rows per forward/backward inside an update, pi_old and the gradient cosine (0: the
  # mini-batch, and the global batch for pi_old): activation memory follows it.
  micro_batch_size: int
  # warn after this many RL steps in a row without learning signal (every group's rewards
  # equal, so every advantage is 0)
  no_signal_warn_steps: int

  def __post_init__(self):
    if not isinstance(self.steps, int) or self.steps < 0:
      _fail("rl.steps", f"must be an integer >= 0 (0: cold start only), got {self.steps!r}")
    for field in ("prompts_per_step", "group_size", "mini_batch_size", "eval_every",
                  "no_signal_warn_steps"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        _fail(f"rl.{field}", f"must be a positive integer, got {getattr(self, field)!r}")
    if any(not isinstance(s, int) or s < 0 for s in self.full_eval_steps):
      _fail("rl.full_eval_steps", f"must be RL steps >= 0, got {self.full_eval_steps!r}")
    if self.group_size < 2:
      _fail("rl.group_size", f"must be >= 2: advantages compare the responses of a prompt "
            f"with each other, got {self.group_size}")
    if self.global_batch % self.mini_batch_size:
      _fail("rl.mini_batch_size", f"({self.mini_batch_size}) must divide the global batch "
            f"rl.prompts_per_step * rl.group_size = {self.global_batch}")
    _check_micro("rl", self.micro_batch_size, "mini_batch_size", self.mini_batch_size)
    if self.routing_replay not in ROUTING_REPLAY:
      _fail("rl.routing_replay", f"must be one of {ROUTING_REPLAY}, got {self.routing_replay!r}")

  @property
  def global_batch(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def num_minibatches(self) -> int:
    return self.global_batch // self.mini_batch_size

  @property
  def micro_per_update(self) -> int:
    return _micro(self.mini_batch_size, self.micro_batch_size)

  @property
  def micro_per_global_batch(self) -> int:
    return _micro(self.global_batch, self.micro_batch_size)


def _micro(rows: int, micro_batch_size: int) -> int:
  return rows // micro_batch_size if micro_batch_size else 1


def _check_micro(stage: str, micro_batch_size, of: str, rows: int) -> None:
  if not isinstance(micro_batch_size, int) or micro_batch_size < 0 or (
      micro_batch_size and rows % micro_batch_size):
    _fail(f"{stage}.micro_batch_size", f"must be 0 (no micro-batches) or divide "
          f"{stage}.{of} ({rows}), got {micro_batch_size!r}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Cold start: stop at `target_accuracy` on `eval_size` held-out problems, or max_steps."""
  max_steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  eval_every: int
  eval_size: int
  target_accuracy: float
  micro_batch_size: int  # rows per forward/backward inside an update; 0: the batch

  def __post_init__(self):
    _check_micro("sft", self.micro_batch_size, "batch_size", self.batch_size)
    for field in ("batch_size", "eval_every", "eval_size"):
      if getattr(self, field) < 1:
        _fail(f"sft.{field}", f"must be >= 1, got {getattr(self, field)}")
    if self.max_steps < 0:
      _fail("sft.max_steps", f"must be >= 0 (0 skips SFT), got {self.max_steps}")

  @property
  def micro_per_update(self) -> int:
    return _micro(self.batch_size, self.micro_batch_size)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int
  keep: int

  def __post_init__(self):
    if self.every < 1 or self.keep < 1:
      _fail("checkpoint.every/keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  """Where a run's metrics go: metrics.jsonl and TensorBoard always; Weights & Biases too
  when `wandb_project` is set (the `[wandb]` extra; WANDB_MODE, WANDB_ENTITY as usual)."""
  progress: bool
  plots: bool
  wandb_project: Optional[str] = None

  def __post_init__(self):
    if self.wandb_project and importlib.util.find_spec("wandb") is None:
      _fail("log.wandb_project", f"is {self.wandb_project!r} but the wandb package is not "
            "installed: pip install -e '.[wandb]'")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping, linear warmup then constant, non-finite guard."""
  learning_rate: float
  warmup_steps: int = 0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  max_skipped_in_a_row: int = 10
  stage: str = "optim"  # the section whose learning_rate/warmup_steps these are (errors)

  def __post_init__(self):
    where = lambda field: where_field(self.stage, field)
    for field in ("learning_rate", "eps", "grad_clip"):
      if not getattr(self, field) > 0:
        _fail(where(field), f"must be > 0, got {getattr(self, field)}")
    for field in ("b1", "b2"):
      if not 0 <= getattr(self, field) < 1:
        _fail(where(field), f"must be in [0, 1), got {getattr(self, field)}")
    for field in ("warmup_steps", "weight_decay"):
      if getattr(self, field) < 0:
        _fail(where(field), f"must be >= 0, got {getattr(self, field)}")
    if self.max_skipped_in_a_row < 1:
      _fail(where("max_skipped_in_a_row"), f"must be >= 1, got {self.max_skipped_in_a_row}")

  def check_representable(self, dtype) -> None:
    """Values that round to 0 or inf in the parameter dtype (optimizer state shares it):
    `eps=1e-50` is 0 in float32 and divides by zero at the first update."""
    for field in ("learning_rate", "eps"):
      with np.errstate(over="ignore"):  # an overflow is reported below, in one line
        value = np.asarray(getattr(self, field), dtype)
      if not (np.isfinite(value) and value > 0):
        _fail(where_field(self.stage, field), f"is {getattr(self, field)}, which is "
              f"{value.item()} in the parameter dtype {np.dtype(dtype).name}")


_PER_STAGE = ("learning_rate", "warmup_steps")
# the `optim` section
_SHARED_OPTIM = ("b1", "b2", "eps", "weight_decay", "grad_clip", "max_skipped_in_a_row")


def where_field(stage: str, field: str) -> str:
  """The config key of an optimizer field: per-stage fields live in `rl.*` / `sft.*`."""
  return f"{stage if field in _PER_STAGE else 'optim'}.{field}"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything one experiment needs, validated."""
  seed: int
  init_from: Optional[str]  # an orbax params directory (scripts/convert_hf.py) or None
  model: ModelConfig
  mesh: Mapping[str, int]
  data: DataConfig
  sampler: SamplerConfig
  objective: objectives.ObjectiveConfig
  rl: RLConfig
  sft: SFTConfig
  optim: Mapping[str, float]
  checkpoint: CheckpointConfig
  log: LogConfig

  def rl_optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.rl.learning_rate,
                       warmup_steps=self.rl.warmup_steps, stage="rl", **self.optim)

  def sft_optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.sft.learning_rate,
                       warmup_steps=self.sft.warmup_steps, stage="sft", **self.optim)


def from_config(config, tokenizer: Optional[tokenizer_lib.Tokenizer] = None) -> Settings:
  """Validates every section and their cross-constraints; raises before any compile.

  Args:
    config: the experiment ConfigDict (`config_base.get_base_config()` and overrides).
    tokenizer: the run's tokenizer; default: the one `config.data` names (its EOS and pad
      ids configure the sampler).
  """
  data = sections.build(DataConfig, config.data, "data")
  if tokenizer is None:
    tokenizer = tokenizer_lib.load(data.tokenizer)
  model = sections.build(ModelConfig, config.model, "model")
  sampler = sections.build(SamplerConfig, config.sampler, "sampler",
                           eos_ids=tuple(tokenizer.eos_ids), pad_id=tokenizer.pad_id)
  settings = Settings(
      seed=int(config.seed), init_from=config.init_from or None, model=model,
      mesh=dict(config.mesh), data=data, sampler=sampler,
      objective=sections.build(objectives.ObjectiveConfig, config.objective, "objective"),
      rl=sections.build(RLConfig, config.rl, "rl"),
      sft=sections.build(SFTConfig, config.sft, "sft"), optim=dict(config.optim),
      checkpoint=sections.build(CheckpointConfig, config.checkpoint, "checkpoint"),
      log=sections.build(LogConfig, config.log, "log"))
  unknown = sorted(set(settings.optim) - set(_SHARED_OPTIM))
  if unknown:
    _fail("optim", f"has unknown fields {unknown}; known: {list(_SHARED_OPTIM)} "
          "(learning_rate and warmup_steps are set per stage: rl.*, sft.*)")
  for optim in (settings.rl_optim(), settings.sft_optim()):  # validates the optim section
    optim.check_representable(model.weight_dtype)
  _check_together(settings, tokenizer)
  return settings


def _check_together(s: Settings, tokenizer) -> None:
  """Constraints between sections."""
  if tokenizer.vocab_size > s.model.vocab_size:
    _fail("model.vocab_size", f"({s.model.vocab_size}) must be >= the tokenizer's vocabulary "
          f"({tokenizer.vocab_size})")
  if s.rl.routing_replay != "none" and s.model.num_moe_layers == 0:
    _fail("rl.routing_replay", f"is {s.rl.routing_replay!r} but the model has no MoE "
          "layer (every layer is in model.moe_layers_skip): there is no routing to replay")
  if s.data.max_prompt_len % s.sampler.prompt_bucket:
    _fail("data.max_prompt_len", f"({s.data.max_prompt_len}) must be a multiple of "
          f"sampler.prompt_bucket ({s.sampler.prompt_bucket}) so rollouts and SFT share positions")


def check_trainable(s: Settings) -> None:
  """What training needs beyond a valid config (evaluation and sampling may differ)."""
  if s.rl.steps == 0 or s.rl.allow_greedy:
    return
  if s.sampler.greedy:
    _fail("sampler.temperature", "is 0 (greedy): every response of a group would be the "
          "same, so every advantage is 0 and RL learns nothing; use a temperature > 0 "
          "(or rl.allow_greedy=True if that is intended)")
  if s.sampler.top_k == 1:
    _fail("sampler.top_k", "is 1: every response of a group would be the same, so every "
          "advantage is 0 and RL learns nothing; use top_k 0 (off) or >= 2 (or "
          "rl.allow_greedy=True if that is intended)")
