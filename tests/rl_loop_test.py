"""The main job end to end on the smoke config: outputs, resume equivalence, config errors."""
import importlib.util
import json
import os
import pathlib
import signal

import pytest

from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax.rl import loop
from minirl_jax.rl import settings
from minirl_jax.rl import train_state

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
REQUIRED_RL = ("reward/mean", "eval/accuracy", "policy/entropy", "mismatch/kl_mu_pi_old",
               "policy/clip_frac", "is/weight_mean", "is/first_order_error",
               "moe/routing_disagreement", "moe/load_max", "time/sample_s", "time/train_s",
               "time/step_s", "throughput/tok_s", "is/grad_cosine_token_seq")


def smoke_config(**overrides):
  spec = importlib.util.spec_from_file_location("smoke", CONFIGS / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    if "." in key:
      section, field = key.split(".")
      config[section][field] = value
    else:
      config[key] = value
  return config


def smoke_run(workdir, **overrides):
  return loop.Run(settings.from_config(smoke_config(**overrides)), str(workdir))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _deterministic(record):
  """The numbers of a record that do not depend on wall-clock time."""
  return {k: v for k, v in record.items()
          if k not in ("stage", "step") and not k.startswith(("time/", "throughput/"))}


# 4 RL steps, with the full evaluation (32 problems; the frequent one has 16) before the
# first and after the third.
RL_4 = {"rl.steps": 4, "rl.full_eval_steps": (0, 3), "data.full_eval_size": 32}


def test_main_job_outputs_and_resume_equivalence(tmp_path):
  full = str(tmp_path / "full")
  summary = smoke_run(full, **RL_4).run()
  records = _records(full)
  sft = [r for r in records if r["stage"] == "sft"]
  rl = [r for r in records if r["stage"] == "rl"]
  assert [r["step"] for r in sft] == [1, 2, 3, 4] and all("sft/loss" in r for r in sft)
  assert any("eval/accuracy" in r for r in sft)
  assert [r["step"] for r in rl] == [0, 1, 2, 3, 4]
  for key in REQUIRED_RL:
    assert any(key in r for r in rl), key
  for name in ("reward_mean", "eval_accuracy", "policy_entropy", "mismatch_kl_mu_pi_old"):
    assert os.path.getsize(os.path.join(full, f"{name}.png")) > 1000
  assert summary["rl_steps"] == 4 and os.listdir(os.path.join(full, "tensorboard"))
  assert [r["step"] for r in rl if "eval/accuracy_full" in r] == [0, 3]
  assert all(0 <= r["eval/accuracy_full"] <= 1 for r in rl if "eval/accuracy_full" in r)
  no_signal = sum(r["reward/zero_adv_frac"] == 1 for r in rl if r["step"] > 0)
  assert summary["rl_steps_without_signal"] == no_signal
  assert summary["collapsed_at_rl_step"] == collapse.collapse_step(rl)

  # SIGTERM (preemption) during RL step 2: the step finishes, a checkpoint is written, the
  # run stops with 128 + 15; the same command resumes and logs the same numbers.
  resumed = str(tmp_path / "resumed")
  run = smoke_run(resumed, **RL_4)
  rl_step = run._rl_step
  def preempted_in_step_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return rl_step(step)
  run._rl_step = preempted_in_step_2
  with pytest.raises(errors.RunStopped, match=r"SIGTERM after rl step 2: checkpoint 6 saved "
                     r"under .*; run the same command to resume") as stop:
    run.run()
  assert stop.value.status == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
  assert max(r["step"] for r in _records(resumed) if r["stage"] == "rl") == 2
  resumed_summary = smoke_run(resumed, **RL_4).run()
  assert resumed_summary["rl_steps_without_signal"] == no_signal  # recounted on resume
  again = _records(resumed)
  assert [(r["stage"], r["step"]) for r in again] == [(r["stage"], r["step"]) for r in records]
  for a, b in zip(records, again):
    if a["stage"] == "rl" and a["step"] >= 3 or a["stage"] == "sft":
      assert _deterministic(a) == pytest.approx(_deterministic(b), rel=1e-6, abs=1e-7), a["step"]


def test_run_stops_at_its_collapse_and_stays_stopped(tmp_path, caplog):
  """rl.stop_on_collapse: the step the criterion fires at (entropy forced under the floor at
  RL step 2) is the last one, checkpointed; the same command again runs no further step."""
  workdir = str(tmp_path / "run")
  run = smoke_run(workdir, **{"rl.steps": 4, "rl.stop_on_collapse": True})
  rl_step = run._rl_step
  def entropy_gone_at_step_2(step):
    m = rl_step(step)
    return m | {"policy/entropy": 0.0} if step == 2 else m
  run._rl_step = entropy_gone_at_step_2
  with caplog.at_level("WARNING"):
    summary = run.run()
  assert [w for w in (r.getMessage() for r in caplog.records) if "collapsed" in w] == [
      "RL step 2: the run collapsed by the stated criterion (held-out accuracy below 0.5 x "
      "its running peak (once >= 0.1), entropy below 0.02 nats per token, a metric not "
      "finite or an update skipped); it stops here (rl.stop_on_collapse)"]
  assert summary["rl_steps"] == 2 and summary["collapsed_at_rl_step"] == 2
  rl_steps = lambda: [r["step"] for r in _records(workdir) if r["stage"] == "rl"]
  assert rl_steps() == [0, 1, 2]
  again = smoke_run(workdir, **{"rl.steps": 4, "rl.stop_on_collapse": True}).run()
  assert again["rl_steps"] == 2 and again["collapsed_at_rl_step"] == 2
  assert rl_steps() == [0, 1, 2]


@pytest.mark.parametrize("overrides,field", [
    ({"rl.mini_batch_size": 6}, "rl.mini_batch_size"),
    ({"rl.group_size": 1, "rl.mini_batch_size": 4}, "rl.group_size"),
    ({"rl.routing_replay": "r3"}, "rl.routing_replay"),
    ({"objective.eps_low": 1.5}, "objective.eps_low"),
    ({"sampler.dtype": "fp4"}, "sampler.dtype"),
    ({"rl.full_eval_steps": (-1,)}, "rl.full_eval_steps"),
    ({"data.full_eval_size": -1}, "data.full_eval_size"),
    ({"data.max_prompt_len": 4, "sampler.prompt_bucket": 4}, "data.max_prompt_len"),
])
def test_bad_config_raises_before_compiling(tmp_path, monkeypatch, overrides, field):
  config = smoke_config(**overrides)
  if field == "rl.routing_replay":
    config.model.moe_layers_skip = (0, 1)  # a dense model: nothing to replay
  def compiled(*args, **kwargs):
    raise AssertionError("compiled before validating the config")
  monkeypatch.setattr(train_state, "random_init", compiled)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    loop.Run(settings.from_config(config), str(tmp_path))


def test_init_from_converted_hf_checkpoint(tmp_path):
  import dataclasses
  import chex
  from minirl_jax import hf_io
  fixture = CONFIGS.parent / "tests" / "fixtures" / "qwen3_moe_tiny"
  out = str(tmp_path / "orbax")
  cfg = hf_io.hf_to_orbax(str(fixture), out)
  _, expected = hf_io.load_hf(str(fixture))
  config = smoke_config(init_from=out)
  config.model.update({k: v for k, v in dataclasses.asdict(cfg).items()})
  run = loop.Run(settings.from_config(config), str(tmp_path / "run"))
  chex.assert_trees_all_close(run.state.params, expected)
  run.close()
  config.model.d_model = cfg.d_model * 2
  with pytest.raises(ValueError, match=r"model\.d_model"):
    loop.Run(settings.from_config(config), str(tmp_path / "run2"))


def always_one(prompt, completion, answer):
  del prompt, completion, answer
  return 1.0


def test_user_reward_function_is_plugged_in_by_name():
  from minirl_jax.rl import data
  config = smoke_config(**{"data.reward": f"{__name__}:always_one"})
  assert data.build(settings.from_config(config)).reward_fn is always_one
  for bad in ("no_colon", f"{__name__}:missing", "no_such_module_xyz:f"):
    with pytest.raises(ValueError, match="data.reward"):
      data.build(settings.from_config(smoke_config(**{"data.reward": bad})))


def test_eval_trainer_samples_the_trainers_own_policy(tmp_path):
  """rl.eval_trainer: with a float32 sampler the sampler's policy is the trainer's, so the
  two evaluations agree exactly; the sampler's Monte Carlo entropy is logged each step."""
  overrides = {"rl.steps": 2, "rl.eval_every": 2, "rl.eval_trainer": True,
               "sampler.dtype": "float32", "rl.full_eval_steps": (0, 2),
               "data.full_eval_size": 32, "log.plots": False}
  smoke_run(str(tmp_path / "run"), **overrides).run()
  rl = [r for r in _records(str(tmp_path / "run")) if r["stage"] == "rl"]
  for r in (rl[0], rl[2]):
    assert r["eval/accuracy_trainer"] == r["eval/accuracy"]
    assert r["eval/accuracy_full_trainer"] == r["eval/accuracy_full"]
  assert "eval/accuracy_trainer" not in rl[1]
  assert all(r["rollout/sampler_entropy"] > 0 for r in rl[1:])
