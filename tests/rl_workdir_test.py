"""A run's hold on its workdir: the lock and the resume-settings check."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from minirl_jax import errors
from minirl_jax.rl import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class _Model:
  d_model: int = 32
  remat: bool = False


@dataclasses.dataclass(frozen=True)
class _RL:
  steps: int = 4
  routing_replay: str = "none"


@dataclasses.dataclass(frozen=True)
class _Settings:
  seed: int = 0
  model: _Model = _Model()
  rl: _RL = _RL()


def _with_checkpoint(path):
  os.makedirs(path / "checkpoints" / "3")
  return str(path)


def test_differences_name_every_changed_leaf_in_field_order():
  old = {"seed": 0, "model": {"d_model": 32, "top_k": 2}, "rl": {"steps": 4}}
  new = {"seed": 1, "model": {"d_model": 64, "top_k": 2}, "rl": {"steps": 4, "extra": 1}}
  assert workdir_lib.differences(old, new) == [
      ("seed", 0, 1), ("model.d_model", 32, 64), ("rl.extra", None, 1)]


def test_a_resume_with_another_model_names_each_field_saved_and_now(tmp_path):
  workdir = _with_checkpoint(tmp_path)
  workdir_lib.record(workdir, _Settings())
  changed = _Settings(seed=3, model=_Model(d_model=64))
  with pytest.raises(errors.UserError) as e:
    workdir_lib.claim(workdir, changed)
  assert "field: saved -> now: seed: 0 -> 3; model.d_model: 32 -> 64. Resume" in str(e.value)
  # The refusal released the lock: the right config claims the workdir at once.
  workdir_lib.claim(workdir, _Settings()).release()


def test_a_resume_may_change_only_length_layout_and_logging(tmp_path):
  workdir = _with_checkpoint(tmp_path)
  workdir_lib.record(workdir, _Settings())
  longer = _Settings(model=_Model(remat=True), rl=_RL(steps=400))
  workdir_lib.claim(workdir, longer).release()
  with pytest.raises(errors.UserError, match=r"rl\.routing_replay: 'none' -> 'r3'"):
    workdir_lib.claim(workdir, _Settings(rl=_RL(routing_replay="r3")))


def test_settings_are_checked_only_when_there_is_a_checkpoint_to_resume(tmp_path):
  workdir = str(tmp_path)
  workdir_lib.record(workdir, _Settings())  # a start that never reached a checkpoint
  workdir_lib.claim(workdir, _Settings(seed=9)).release()
  branched = _with_checkpoint(tmp_path / "arm")  # a grid arm: checkpoints, no record
  workdir_lib.claim(branched, _Settings(seed=9)).release()


_HOLD = textwrap.dedent("""
    import sys, time
    from minirl_jax.rl import workdir
    held = workdir.Claim(sys.argv[1])
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_second_process_is_refused_naming_the_holder_until_it_dies(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(errors.UserError,
                       match=rf"in use by process {holder.pid} \(it holds run.lock\)"):
      workdir_lib.Claim(str(tmp_path))
  finally:
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait()
  claim = workdir_lib.Claim(str(tmp_path))
  with open(tmp_path / workdir_lib.LOCK) as f:
    assert f.read().strip() == str(os.getpid())
  claim.release()
