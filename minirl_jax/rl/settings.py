"""Turns an experiment ConfigDict into validated, frozen dataclasses before anything compiles.

Defaults live in one place, `minirl_jax/config_base.py`; these dataclasses have none.

Every error names the offending field (`rl.mini_batch_size ...`).
"""
import dataclasses
from typing import Any, Mapping, Optional

from minirl_jax import objectives
from minirl_jax.models.config import ModelConfig
from minirl_jax.rl.train_step import OptimConfig
from minirl_jax.sampling.config import SamplerConfig

ROUTING_REPLAY = ("none", "r2", "r3")


def _fail(field, message):
  raise ValueError(f"{field} {message}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: Optional[str]
  eval_path: Optional[str]
  num_operands: int
  max_value: int
  operators: str
  max_prompt_len: int
  eval_size: int
  tokenizer: Optional[str]
  reward: Optional[str]
  reward_timeout_s: float

  def __post_init__(self):
    if self.max_prompt_len < 1 or self.eval_size < 1:
      _fail("data.max_prompt_len/eval_size", "must be >= 1")
    if not self.reward_timeout_s > 0:
      _fail("data.reward_timeout_s", f"must be > 0, got {self.reward_timeout_s}")
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
  learning_rate: float
  warmup_steps: int

  def __post_init__(self):
    for field in ("steps", "prompts_per_step", "group_size", "mini_batch_size", "eval_every"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        _fail(f"rl.{field}", f"must be a positive integer, got {getattr(self, field)!r}")
    if self.group_size < 2:
      _fail("rl.group_size", f"must be >= 2: advantages compare the responses of a prompt "
            f"with each other, got {self.group_size}")
    if self.global_batch % self.mini_batch_size:
      _fail("rl.mini_batch_size", f"({self.mini_batch_size}) must divide the global batch "
            f"rl.prompts_per_step * rl.group_size = {self.global_batch}")
    if self.routing_replay not in ROUTING_REPLAY:
      _fail("rl.routing_replay", f"must be one of {ROUTING_REPLAY}, got {self.routing_replay!r}")

  @property
  def global_batch(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def num_minibatches(self) -> int:
    return self.global_batch // self.mini_batch_size


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

  def __post_init__(self):
    for field in ("batch_size", "eval_every", "eval_size"):
      if getattr(self, field) < 1:
        _fail(f"sft.{field}", f"must be >= 1, got {getattr(self, field)}")
    if self.max_steps < 0:
      _fail("sft.max_steps", f"must be >= 0 (0 skips SFT), got {self.max_steps}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int
  keep: int

  def __post_init__(self):
    if self.every < 1 or self.keep < 1:
      _fail("checkpoint.every/keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  progress: bool
  plots: bool


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int
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
                       warmup_steps=self.rl.warmup_steps, **self.optim)

  def sft_optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.sft.learning_rate,
                       warmup_steps=self.sft.warmup_steps, **self.optim)


def section(cls, values: Mapping[str, Any], name: str, **extra):
  """Builds dataclass `cls` from a config section, naming unknown keys."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{name} has unknown fields {unknown}; known: {sorted(known)}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return cls(**values, **extra)


def from_config(config, tokenizer) -> Settings:
  """Validates every section and their cross-constraints; raises before any compile."""
  model = section(ModelConfig, config.model, "model")
  sampler = section(SamplerConfig, config.sampler, "sampler",
                    eos_ids=tuple(tokenizer.eos_ids), pad_id=tokenizer.pad_id)
  settings = Settings(
      seed=int(config.seed), model=model, mesh=dict(config.mesh),
      data=section(DataConfig, config.data, "data"), sampler=sampler,
      objective=section(objectives.ObjectiveConfig, config.objective, "objective"),
      rl=section(RLConfig, config.rl, "rl"), sft=section(SFTConfig, config.sft, "sft"),
      optim=dict(config.optim), checkpoint=section(CheckpointConfig, config.checkpoint,
                                                   "checkpoint"),
      log=section(LogConfig, config.log, "log"))
  settings.rl_optim(), settings.sft_optim()  # validate the optimizer section
  if tokenizer.vocab_size > model.vocab_size:
    _fail("model.vocab_size", f"({model.vocab_size}) must be >= the tokenizer's vocabulary "
          f"({tokenizer.vocab_size})")
  if settings.rl.routing_replay != "none" and model.num_moe_layers == 0:
    _fail("rl.routing_replay", f"is {settings.rl.routing_replay!r} but the model has no MoE "
          "layer (every layer is in model.moe_layers_skip): there is no routing to replay")
  if settings.data.max_prompt_len % sampler.prompt_bucket:
    _fail("data.max_prompt_len", f"({settings.data.max_prompt_len}) must be a multiple of "
          f"sampler.prompt_bucket ({sampler.prompt_bucket}) so rollouts and SFT share positions")
  return settings
