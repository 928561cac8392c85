"""A run's step calls, bound once: `bind(settings, mesh, tokenizer, reward_fn)` returns a
frozen `RunSteps` whose methods are `rl.step`'s data flow with the run's configs, mesh and
data filled in. The jitted programs come from `jitted`, the one place that decides how
each is jitted (what `rl.programs` lowers and the memory plan compiles are these too).
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax

from minirl_jax import sharding
from minirl_jax.data import scoring
from minirl_jax.models import transformer
from minirl_jax.rl import losses
from minirl_jax.rl import rollout as rollout_lib
from minirl_jax.rl import settings as settings_lib
from minirl_jax.rl import step
from minirl_jax.rl import train_state
from minirl_jax.sampling import quantize as quantize_lib


@dataclasses.dataclass(frozen=True)
class Jitted:
  """The run's jitted trainer programs (state donated; kept on `state_sharding` if set)."""
  sft_step: Callable     # (state, batch) -> (state, metrics)
  rl_step: Callable      # (state, mini_batch) -> (state, metrics)
  pi_old: Callable       # (params, rollout, advantages) -> (TrainBatch, metrics)
  cosine: Optional[Callable]  # (params, mini_batch) -> J_token / J_seq gradient cosine
  optimizers: train_state.Optimizers


def jitted(s: settings_lib.Settings, state_sharding=None) -> Jitted:
  """How each trainer program of a run is jitted."""
  step_kw = dict(donate_argnums=0)
  if state_sharding is not None:
    mesh = jax.tree.leaves(state_sharding)[0].mesh
    step_kw["out_shardings"] = (state_sharding, sharding.replicated(mesh))
  optimizers = train_state.optimizers(s)
  cosine = None
  if s.objective.grad_cosine_every:
    cosine = jax.jit(functools.partial(
        losses.grad_cosine_token_seq, model_cfg=s.model, obj_cfg=s.objective,
        micro_batches=s.rl.micro_per_update))
  return Jitted(
      sft_step=jax.jit(functools.partial(
          step.sft_step, model_cfg=s.model, optimizer=optimizers.sft,
          micro_batches=s.sft.micro_per_update), **step_kw),
      rl_step=jax.jit(functools.partial(
          step.rl_step, model_cfg=s.model, obj_cfg=s.objective, optimizer=optimizers.rl,
          micro_batches=s.rl.micro_per_update), **step_kw),
      pi_old=jax.jit(functools.partial(
          step.pi_old, model_cfg=s.model, obj_cfg=s.objective,
          routing_replay=s.rl.routing_replay, group_size=s.rl.group_size,
          micro_batches=s.rl.micro_per_global_batch)),
      cosine=cosine, optimizers=optimizers)


@dataclasses.dataclass(frozen=True)
class RunSteps:
  """One run's RL step calls (`rl.step`'s module docstring), each on the run's mesh."""
  s: settings_lib.Settings
  mesh: Any
  tokenizer: Any
  scorer: scoring.RewardScorer
  programs: Jitted
  # Only training steps count towards stopping a run whose reward function keeps failing.
  streak: scoring.ErrorStreak
  # Where `sample` runs: the sampler's own mesh (rl.placement=disaggregated), else `mesh`.
  sampler_mesh: Any = None

  @property
  def optimizers(self) -> train_state.Optimizers:
    return self.programs.optimizers

  def sample(self, sampler_params, prompts: dict, key, group_size: Optional[int] = None):
    """The rollout of a prompt batch: `group_size` (default rl.group_size) per prompt."""
    return rollout_lib.sample(sampler_params, prompts, key,
                              group_size=group_size or self.s.rl.group_size,
                              model_cfg=self.s.model, sampler_cfg=self.s.sampler,
                              mesh=self.mesh if self.sampler_mesh is None else self.sampler_mesh)

  def score(self, rollout, prompts: dict, group_size: Optional[int] = None,
            count_errors: bool = True):
    """(rewards, metrics) of a training step's rollout (`count_errors`: towards the
    reward-error stop; evaluation's do not count)."""
    return rollout_lib.score(rollout, prompts, group_size=group_size or self.s.rl.group_size,
                             scorer=self.scorer, tokenizer=self.tokenizer,
                             eos_ids=self.s.sampler.eos_ids, mesh=self.mesh,
                             streak=self.streak if count_errors else None)

  def advantages(self, rewards):
    return step.advantages(rewards, group_size=self.s.rl.group_size, obj_cfg=self.s.objective)

  def pi_old(self, params, rollout, advantages):
    """pi_old's log-probs of the rollout and the TrainBatch (`step.pi_old`)."""
    return self._on_mesh(self.programs.pi_old)(params, rollout, advantages)

  def update(self, state, batch, step_index: int):
    """The step's N mini-batch updates (and, every `objective.grad_cosine_every` steps, the
    gradient cosine)."""
    every = self.s.objective.grad_cosine_every
    due = every and step_index % every == 0
    return step.minibatch_updates(
        state, batch, step_index, train_fn=self._on_mesh(self.programs.rl_step),
        cosine_fn=self._on_mesh(self.programs.cosine) if due else None, seed=self.s.seed,
        mini_batch_size=self.s.rl.mini_batch_size, mesh=self.mesh)

  def sft_update(self, state, batch):
    return self._on_mesh(self.programs.sft_step)(state, batch)

  def quantize(self, params):
    """The sampler's weights: the next step's rollout policy."""
    return quantize_lib.for_sampler(params, self.s.sampler, transformer.param_axes(self.s.model))

  def evaluate(self, sampler_params, batches, key, samples: int = 1) -> dict[str, float]:
    """Held-out avg@k and pass@k (k = samples)."""
    score = functools.partial(self.score, count_errors=False)
    return rollout_lib.evaluate(sampler_params, batches, key, samples=samples,
                                sample_fn=self.sample, score_fn=score, mesh=self.mesh)

  def close(self):
    """Stops the reward workers."""
    self.scorer.close()

  def _on_mesh(self, fn):
    return sharding.on_mesh(self.mesh, fn)


def bind(s: settings_lib.Settings, mesh, tokenizer, reward_fn,
         state_sharding=None, sampler_mesh=None) -> RunSteps:
  """A run's step calls.

  Args:
    s: the run's settings.
    mesh: its mesh.
    tokenizer: decodes completions for the reward.
    reward_fn: R(prompt, completion, answer), run in worker processes under a timeout.
    state_sharding: the TrainState's shardings (the updates keep the state there); None
      for evaluation-only use.
    sampler_mesh: the sampler's own mesh (rl.placement=disaggregated); None: `mesh`.
  """
  return RunSteps(s=s, mesh=mesh, tokenizer=tokenizer,
                  scorer=scoring.RewardScorer(reward_fn, timeout_s=s.data.reward_timeout_s),
                  programs=jitted(s, state_sharding),
                  streak=scoring.ErrorStreak(s.data.reward_max_error_frac),
                  sampler_mesh=sampler_mesh)
