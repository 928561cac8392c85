"""The base config is its dataclasses: each section's keys and defaults are the fields of
the frozen dataclass that reads it, the task knobs are the tasks' own, and a bad value is
one error naming the field."""
import dataclasses
import json
import re

import pytest

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import objectives
from minirl_jax.data import chain_task
from minirl_jax.data import tasks
from minirl_jax.models.config import ModelConfig
from minirl_jax.models.config import MoeImpl
from minirl_jax.objectives.config import ISLevel
from minirl_jax.rl import settings
from minirl_jax.sampling.config import SamplerConfig
from minirl_jax.sampling.quantize import SamplerDtype

# section -> (dataclass, fields the config does not carry, where the tiny run differs)
SECTIONS = {
    "model": (ModelConfig, (), {}),
    "mesh": (settings.MeshConfig, (), {}),
    "sampler": (SamplerConfig, ("eos_ids", "pad_id"),
                {"dtype": "int8", "max_new_tokens": 16, "prompt_bucket": 8}),
    "objective": (objectives.ObjectiveConfig, (), {"grad_cosine_every": 10}),
    "rl": (settings.RLConfig, (), {}),
    "sft": (settings.SFTConfig, (), {}),
    "optim": (settings.OptimSection, (), {}),
    "checkpoint": (settings.CheckpointConfig, (), {}),
    "log": (settings.LogConfig, (), {}),
}


def _defaults(cls):
  return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
          for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_each_section_is_its_dataclass_defaults(name):
  cls, excluded, tiny = SECTIONS[name]
  section = config_base.get_base_config()[name].to_dict()
  want = {k: v for k, v in _defaults(cls).items() if k not in excluded}
  assert section == {**want, **tiny}


def test_data_section_is_its_dataclass_and_the_tasks_knobs():
  section = config_base.get_base_config().data.to_dict()
  knobs = {f.name: f.default for cls in (tasks.ArithmeticTask, chain_task.ChainTask)
           for f in dataclasses.fields(cls) if f.name != "heldout_fraction"}
  assert settings.TASK_KNOBS == knobs
  data = {k: v for k, v in _defaults(settings.DataConfig).items() if k != "task_options"}
  assert section == {**data, **knobs}


def test_task_knobs_reach_the_task_and_are_validated_by_it():
  config = config_base.get_base_config()
  config.data.update(task="chain", max_steps=5, modulus=97, num_operands=3)
  task = settings.from_config(config).data.make_task()
  assert task == chain_task.ChainTask(max_steps=5, modulus=97)  # num_operands is not its
  config.data.update(task="arithmetic", num_operands=1)
  with pytest.raises(errors.UserError, match=r"^data\.num_operands must be >= 2, got 1$"):
    settings.from_config(config)


def test_mesh_and_optim_are_dataclasses():
  config = config_base.get_base_config()
  config.mesh.update(fsdp=2, data=-1)
  config.optim.b2 = 0.99
  s = settings.from_config(config)
  assert dict(s.mesh) == {"data": -1, "fsdp": 2, "expert": 1, "tensor": 1}
  assert s.rl_optim() == settings.OptimConfig(learning_rate=2e-4, b2=0.99, stage="rl")
  config.mesh.expert = 0
  with pytest.raises(errors.UserError, match=r"^mesh\.expert must be -1 .* got 0$"):
    settings.from_config(config)


@pytest.mark.parametrize("field,choice", [
    ("rl.routing_replay", settings.RoutingReplay), ("objective.is_level", ISLevel),
    ("model.moe_impl", MoeImpl), ("sampler.dtype", SamplerDtype)])
def test_a_field_that_selects_behaviour_is_a_choice_set_by_its_string(field, choice):
  """The config (flags, JSON) holds the plain string; the settings hold the member, equal
  to it; a bad value is one error naming the field and every allowed value."""
  section, name = field.split(".")
  config = config_base.get_base_config()
  assert type(config[section][name]) is str
  value = choice.values()[1]
  config[section][name] = value
  got = getattr(getattr(settings.from_config(config), section), name)
  assert got is choice(value) and got == value and json.dumps(got) == f'"{value}"'
  assert f"{got}" == value and repr(got) == repr(value)
  config[section][name] = "nope"
  with pytest.raises(errors.UserError, match=f"^{re.escape(field)} must be one of "
                     f"{re.escape(str(choice.values()))}, got 'nope'$"):
    settings.from_config(config)
