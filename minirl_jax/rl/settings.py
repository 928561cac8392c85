"""Turns an experiment ConfigDict into validated, frozen dataclasses before anything compiles.

`from_config` is the only function that reads a ConfigDict: everything after it (the data
builder, `loop.Run`, the RL step functions, the scripts) takes these dataclasses. Each
section's keys and defaults are its dataclass's fields (`config_base` builds the base
config from them). Every error names the offending field (`rl.mini_batch_size ...`).
"""
import collections.abc
import dataclasses
import importlib.util
from typing import Any, Optional

import numpy as np

from minirl_jax import errors
from minirl_jax import objectives
from minirl_jax import sections
from minirl_jax.data import chain_task
from minirl_jax.data import tasks
from minirl_jax.data import tokenizer as tokenizer_lib
from minirl_jax.models.config import ModelConfig
from minirl_jax.sampling.config import SamplerConfig

_fail = sections.fail


class RoutingReplay(sections.Choice):
  """Which experts the trainer's forwards run (`rl.routing_replay`; `step.replayed_routing`)."""
  NONE = "none"  # every forward routes live
  R2 = "r2"      # the updates replay the experts pi_old's forward chose
  R3 = "r3"      # pi_old's forward and the updates replay the sampler's (routing_mu)


# The synthetic tasks (docs/data.md); each declares its own knobs and their defaults.
SYNTHETIC_TASKS = {"arithmetic": tasks.ArithmeticTask, "chain": chain_task.ChainTask}


def _task_knobs() -> dict[str, Any]:
  """Every synthetic task's knobs with their defaults (`data.<knob>` in a config); a knob
  two tasks share must default alike. The held-out split is not a knob."""
  knobs: dict[str, Any] = {}
  for cls in SYNTHETIC_TASKS.values():
    for f in dataclasses.fields(cls):
      if f.name != "heldout_fraction" and knobs.setdefault(f.name, f.default) != f.default:
        raise TypeError(f"task knob {f.name} defaults differently across tasks")
  return knobs


TASK_KNOBS = _task_knobs()


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where prompts, answers and rewards come from: a real data path, or a synthetic task
  (`task` and its knobs, `task_options`: `data.num_operands`, `data.max_steps`, ...)."""
  path: Optional[str] = None  # JSONL/Parquet {prompt, answer[, solution]}; unset: synthetic
  eval_path: Optional[str] = None  # held-out set for a real data path
  task: str = "arithmetic"  # a SYNTHETIC_TASKS name
  task_options: tuple[tuple[str, Any], ...] = tuple(TASK_KNOBS.items())
  max_prompt_len: int = 8
  eval_size: int = 256
  # held-out problems of the full evaluation at rl.full_eval_steps (0: none); the
  # eval_size problems of the frequent one are its first ones
  full_eval_size: int = 0
  tokenizer: Optional[str] = None  # tokenizer.json for real data; unset: characters
  # "package.module:function" computing R(prompt, completion, answer) in [0, 1];
  # unset: exact match (synthetic task) or math_reward (data.path).
  reward: Optional[str] = None
  reward_timeout_s: float = 5.0  # a reward call past this scores 0 (reward/timeouts)
  # the run stops when more than this fraction of a step's reward calls fail (raise,
  # time out, or return anything but a number in [0, 1]) for 3 steps in a row
  reward_max_error_frac: float = 0.5

  def make_task(self):
    """The synthetic task `task` with its knobs."""
    cls = SYNTHETIC_TASKS[self.task]
    names = {f.name for f in dataclasses.fields(cls)}
    try:
      return cls(**{k: v for k, v in self.task_options if k in names})
    except errors.UserError as e:
      raise errors.UserError(f"data.{e}") from None

  def __post_init__(self):
    if self.max_prompt_len < 1 or self.eval_size < 1:
      _fail("data.max_prompt_len/eval_size", "must be >= 1")
    if not isinstance(self.full_eval_size, int) or self.full_eval_size < 0:
      _fail("data.full_eval_size", f"must be an integer >= 0, got {self.full_eval_size!r}")
    if self.task not in SYNTHETIC_TASKS:
      _fail("data.task", f"must be one of {tuple(SYNTHETIC_TASKS)}, got {self.task!r}")
    self.make_task()  # validates the task's knobs
    if not self.reward_timeout_s > 0:
      _fail("data.reward_timeout_s", f"must be > 0, got {self.reward_timeout_s}")
    if not 0 <= self.reward_max_error_frac <= 1:
      _fail("data.reward_max_error_frac", f"must be in [0, 1], got {self.reward_max_error_frac}")
    if self.path and not self.eval_path:
      _fail("data.eval_path", "must be set with data.path (a held-out set to report accuracy on)")


class Placement(sections.Choice):
  """`rl.placement`: where the sampler runs (docs/placement.md)."""
  COLOCATED = "colocated"  # on the trainer's devices, in turn with it
  DISAGGREGATED = "disaggregated"  # on its own devices (`rl.sampler_devices`)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The synchronous loop. N = prompts_per_step * group_size / mini_batch_size updates."""
  steps: int = 150
  prompts_per_step: int = 64
  group_size: int = 8
  mini_batch_size: int = 512  # sequences per optimizer update: N = 64 * 8 / 512 = 1
  routing_replay: RoutingReplay = RoutingReplay.NONE
  eval_every: int = 25
  # RL steps (0: before the first) of the full evaluation (`eval/accuracy_full`, on
  # data.full_eval_size problems)
  full_eval_steps: tuple[int, ...] = ()
  learning_rate: float = 2e-4
  warmup_steps: int = 0
  allow_greedy: bool = False  # True: allow samplers whose G responses cannot differ
  # Rows per forward/backward inside an update, pi_old and the gradient cosine (0: the
  # mini-batch, and the global batch for pi_old): activation memory follows it; values do
  # not.
  micro_batch_size: int = 0
  # a warning names this many RL steps in a row whose groups all had equal rewards (zero
  # advantages: nothing to learn; `reward/zero_adv_frac` = 1), and again at each doubling
  no_signal_warn_steps: int = 5
  # True: the run ends at the RL step where the collapse criterion (`minirl_jax.collapse`)
  # fires, checkpointed there; rerunning the command does not resume past it. False: a
  # warning names that step and the run goes on.
  stop_on_collapse: bool = False
  # "disaggregated": the sampler on the first `sampler_devices` devices (0: half) with its
  # own mesh (`sampler_mesh`), the trainer on the rest (`mesh`); weights go one way after
  # each update, rollouts the other.
  # Also evaluate under the trainer's own policy (`eval/accuracy_trainer`, and
  # `eval/accuracy_full_trainer`): the same held-out problems sampled without the sampler's
  # format, in the trainer's compute dtype.
  eval_trainer: bool = False
  placement: Placement = Placement.COLOCATED
  sampler_devices: int = 0
  # Step s's rollouts are sampled with the weights of step s - 1 - max_staleness (those of
  # step 0 while s <= max_staleness), so the sampler can generate the next steps' rollouts
  # while the trainer updates: 0 is synchronous.
  max_staleness: int = 0

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
    sections.set_choice(self, "routing_replay", RoutingReplay, "rl.routing_replay")
    sections.set_choice(self, "placement", Placement, "rl.placement")
    if not isinstance(self.eval_trainer, bool):
      _fail("rl.eval_trainer", f"must be a bool, got {self.eval_trainer!r}")
    for field in ("sampler_devices", "max_staleness"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
        _fail(f"rl.{field}", f"must be an integer >= 0, got {getattr(self, field)!r}")
    if self.sampler_devices and self.placement is Placement.COLOCATED:
      _fail("rl.sampler_devices", f"({self.sampler_devices}) is only read with "
            "rl.placement=disaggregated; the colocated sampler uses the trainer's devices")

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
  max_steps: int = 2000
  batch_size: int = 64
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  eval_every: int = 50
  eval_size: int = 128  # a cheap held-out check that stops SFT early
  target_accuracy: float = 0.3
  micro_batch_size: int = 0  # rows per forward/backward inside an update; 0: the batch

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
  every: int = 50
  keep: int = 2

  def __post_init__(self):
    if self.every < 1 or self.keep < 1:
      _fail("checkpoint.every/keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  """Where a run's metrics go: metrics.jsonl and TensorBoard always; Weights & Biases too
  when `wandb_project` is set (the `[wandb]` extra; WANDB_MODE, WANDB_ENTITY as usual)."""
  progress: bool = True
  plots: bool = True
  # Weights & Biases project for the same scalars, the config and the plots
  # (pip install -e '.[wandb]'); unset: metrics.jsonl and TensorBoard only
  wandb_project: Optional[str] = None

  def __post_init__(self):
    if self.wandb_project and importlib.util.find_spec("wandb") is None:
      _fail("log.wandb_project", f"is {self.wandb_project!r} but the wandb package is not "
            "installed: pip install -e '.[wandb]'")


@dataclasses.dataclass(frozen=True)
class OptimSection:
  """The `optim` section: what the cold start's and RL's optimizers share."""
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  # a run stops after this many steps in a row whose loss, gradients, update or new
  # parameters were not all finite (each left the state as it was)
  max_skipped_in_a_row: int = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(OptimSection):
  """One stage's optimizer: AdamW with global-norm clipping, linear warmup then constant,
  non-finite guard; `learning_rate` and `warmup_steps` are the stage's (rl.*, sft.*)."""
  learning_rate: float
  warmup_steps: int = 0
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


@dataclasses.dataclass(frozen=True)
class MeshConfig(collections.abc.Mapping):
  """Mesh axis sizes (`sharding.MESH_AXES`), readable as a mapping; -1 takes the remaining
  devices. Batches shard over data x fsdp x expert."""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def __post_init__(self):
    for axis, size in self.items():
      if not isinstance(size, int) or not (size == -1 or size >= 1):
        _fail(f"mesh.{axis}", f"must be -1 (the remaining devices) or >= 1, got {size!r}")

  def __getitem__(self, axis: str) -> int:
    if axis not in self.__dataclass_fields__:
      raise KeyError(axis)
    return getattr(self, axis)

  def __iter__(self):
    return iter(self.__dataclass_fields__)

  def __len__(self) -> int:
    return len(self.__dataclass_fields__)


def where_field(stage: str, field: str) -> str:
  """The config key of an optimizer field: per-stage fields live in `rl.*` / `sft.*`."""
  return f"{stage if field in _PER_STAGE else 'optim'}.{field}"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything one experiment needs, validated."""
  seed: int
  init_from: Optional[str]  # an orbax params directory (scripts/convert_hf.py) or None
  model: ModelConfig
  mesh: MeshConfig
  sampler_mesh: MeshConfig  # the sampler's own axes (rl.placement=disaggregated)
  data: DataConfig
  sampler: SamplerConfig
  objective: objectives.ObjectiveConfig
  rl: RLConfig
  sft: SFTConfig
  optim: OptimSection
  checkpoint: CheckpointConfig
  log: LogConfig

  def rl_optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.rl.learning_rate, warmup_steps=self.rl.warmup_steps,
                       stage="rl", **dataclasses.asdict(self.optim))

  def sft_optim(self) -> OptimConfig:
    return OptimConfig(learning_rate=self.sft.learning_rate,
                       warmup_steps=self.sft.warmup_steps, stage="sft",
                       **dataclasses.asdict(self.optim))


def from_config(config, tokenizer: Optional[tokenizer_lib.Tokenizer] = None) -> Settings:
  """Validates every section and their cross-constraints; raises before any compile.

  Args:
    config: the experiment ConfigDict (`config_base.get_base_config()` and overrides).
    tokenizer: the run's tokenizer; default: the one `config.data` names (its EOS and pad
      ids configure the sampler).
  """
  data_section = dict(config.data)
  knobs = {k: data_section.pop(k) for k in TASK_KNOBS if k in data_section}
  data = sections.build(DataConfig, data_section, "data",
                        task_options=tuple({**TASK_KNOBS, **knobs}.items()))
  if tokenizer is None:
    tokenizer = tokenizer_lib.load(data.tokenizer)
  model = sections.build(ModelConfig, config.model, "model")
  sampler = sections.build(SamplerConfig, config.sampler, "sampler",
                           eos_ids=tuple(tokenizer.eos_ids), pad_id=tokenizer.pad_id)
  settings = Settings(
      seed=int(config.seed), init_from=config.init_from or None, model=model,
      mesh=sections.build(MeshConfig, config.mesh, "mesh"),
      sampler_mesh=sections.build(MeshConfig, config.sampler_mesh, "sampler_mesh"),
      data=data, sampler=sampler,
      objective=sections.build(objectives.ObjectiveConfig, config.objective, "objective"),
      rl=sections.build(RLConfig, config.rl, "rl"),
      sft=sections.build(SFTConfig, config.sft, "sft"), optim=_optim_section(config.optim),
      checkpoint=sections.build(CheckpointConfig, config.checkpoint, "checkpoint"),
      log=sections.build(LogConfig, config.log, "log"))
  for optim in (settings.rl_optim(), settings.sft_optim()):  # validates the optim section
    optim.check_representable(model.weight_dtype)
  _check_together(settings, tokenizer)
  return settings


def _optim_section(values) -> OptimSection:
  shared = [f.name for f in dataclasses.fields(OptimSection)]
  unknown = sorted(set(values) - set(shared))
  if unknown:
    _fail("optim", f"has unknown fields {unknown}; known: {shared} "
          "(learning_rate and warmup_steps are set per stage: rl.*, sft.*)")
  return sections.build(OptimSection, values, "optim")


def _check_together(s: Settings, tokenizer) -> None:
  """Constraints between sections."""
  if tokenizer.vocab_size > s.model.vocab_size:
    _fail("model.vocab_size", f"({s.model.vocab_size}) must be >= the tokenizer's vocabulary "
          f"({tokenizer.vocab_size})")
  if s.rl.routing_replay is not RoutingReplay.NONE and s.model.num_moe_layers == 0:
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
