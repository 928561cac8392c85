"""The grid runner: its plan (shared cold starts, run dirs), processes that resume, stop on
SIGTERM and keep going past a failed run, and the quick grid end to end."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from minirl_jax import errors
from minirl_jax.experiments import design
from minirl_jax.experiments import grids
from minirl_jax.experiments import layout
from minirl_jax.experiments import runner

ROOT = pathlib.Path(__file__).parents[1]


def test_plan_shares_cold_starts_and_names_run_dirs(tmp_path):
  grid = grids.get("coldstart")
  cold, arms = runner.plan(grid, 2, str(tmp_path))
  assert len(cold) == 3 and len(arms) == 3 * 2  # three cold starts, shared by the RL seeds
  assert all("--config.rl.steps=0" in j.flags and "--config.seed=0" in j.flags for j in cold)
  short_cold = [j for j in cold if "--config.sft.target_accuracy=0.15" in j.flags]
  short_arms = [j for j in arms if j.cold_start == short_cold[0].workdir]
  assert [j.workdir for j in short_arms] == [str(tmp_path / "minirl_from_sft_short" / s)
                                             for s in ("seed_0", "seed_1")]
  assert all("--config.sft.target_accuracy=0.15" in j.flags for j in short_arms)
  cold, arms = runner.plan(grids.get("onpolicy"), 3, str(tmp_path))
  assert len(cold) == 1 and len(arms) == 10 * 3  # every on-policy arm and seed: one start
  assert arms[0].workdir == str(tmp_path / "minirl" / "seed_0")
  assert arms[0].cold_start == arms[-1].cold_start == cold[0].workdir
  assert "--config.seed=2" in arms[-1].flags
  assert "--config.rl.routing_replay=r3" in arms[1].flags
  capped = design.Grid("capped", "configs/smoke.py",
                       (design.Arm("a", seeds=1), design.Arm("b")), "test")
  _, arms = runner.plan(capped, 3, str(tmp_path))
  assert [j.workdir for j in arms] == [str(tmp_path / a / f"seed_{s}")
                                       for a, s in (("a", 0), ("b", 0), ("b", 1), ("b", 2))]


def test_quick_grid_runs_resumably_as_processes(tmp_path):
  cmd = [sys.executable, str(ROOT / "scripts" / "ablate.py"), "--grid=quick", "--seeds=1",
         "--jobs=2", "--progress=False", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert [r["arm"] for r in result["rows"]] == ["minirl", "minirl_no_is"]
  assert os.path.getsize(result["figure"]) > 10_000
  cold = tmp_path / "_coldstart" / "default" / "seed_0"
  cold_sft = [r for r in map(json.loads, open(cold / "metrics.jsonl")) if r["stage"] == "sft"]
  for arm in ("minirl", "minirl_no_is"):
    records = [json.loads(line) for line in open(tmp_path / arm / "seed_0" / "metrics.jsonl")]
    # The arm branched from the shared cold start: the same SFT records, then its RL steps.
    assert [r for r in records if r["stage"] == "sft"] == cold_sft
    assert [r["step"] for r in records if r["stage"] == "rl"] == [0, 1, 2]

  # A rerun skips finished arms; an arm that lost its summary resumes without redoing steps.
  arm_dir = tmp_path / "minirl" / "seed_0"
  before = (arm_dir / "metrics.jsonl").read_text()
  os.remove(arm_dir / layout.SUMMARY)
  finished = os.path.getmtime(tmp_path / "minirl_no_is" / "seed_0" / layout.SUMMARY)
  subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
  assert (arm_dir / "metrics.jsonl").read_text() == before
  assert os.path.getmtime(tmp_path / "minirl_no_is" / "seed_0" / layout.SUMMARY) == finished


def test_a_run_the_guard_stopped_is_a_result_and_a_crash_is_a_failure(tmp_path, monkeypatch):
  popen = subprocess.Popen
  def fake_train(status):
    code = (f"import sys; print('stopped: rl step 7: ...', file=sys.stderr); "
            f"sys.exit({status})")
    return lambda cmd, **kw: popen([sys.executable, "-c", code], **kw)
  monkeypatch.setattr(runner.subprocess, "Popen", fake_train(errors.STOPPED_STATUS))
  stopped = runner.Job(str(tmp_path / "stopped"), ())
  runner.run_jobs([stopped], base_config="configs/smoke.py", root=str(ROOT), max_jobs=1,
                  desc="t", progress=False)
  assert stopped.done and layout.summary(stopped.workdir) == {
      "stopped": "stopped: rl step 7: ...", "wall_s": pytest.approx(0, abs=60)}
  monkeypatch.setattr(runner.subprocess, "Popen", fake_train(1))
  crashed, after = runner.Job(str(tmp_path / "crashed"), ()), runner.Job(str(tmp_path / "b"), ())
  with pytest.raises(RuntimeError, match=r"2 run\(s\) failed:\n.*crashed failed \(exit 1\)"):
    runner.run_jobs([crashed, after], base_config="configs/smoke.py", root=str(ROOT),
                    max_jobs=1, desc="t", progress=False)
  assert not crashed.done and not after.done  # the next job still ran (and failed alike)
  assert (tmp_path / "b" / "log.txt").exists()


def test_arms_start_when_their_own_cold_start_is_done(tmp_path, monkeypatch):
  # A fake train.py: records when it started and ended, sleeps --sleep s, leaves a
  # checkpoint dir and metrics for its arms to branch from, exits with --exit.
  code = """import json, os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
workdir = args["workdir"]
open(os.path.join(workdir, "started"), "w").write(repr(time.time()))
time.sleep(float(args.get("sleep", 0)))
os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
open(os.path.join(workdir, "metrics.jsonl"), "a").close()
open(os.path.join(workdir, "ended"), "w").write(repr(time.time()))
print(json.dumps({"rl_steps": 0}))
sys.exit(int(args.get("exit", 0)))"""
  popen = subprocess.Popen
  monkeypatch.setattr(runner.subprocess, "Popen",
                      lambda cmd, **kw: popen([sys.executable, "-c", code, *cmd[2:]], **kw))
  run = lambda name: str(tmp_path / name)
  slow_bad = runner.Job(run("cold_a"), ("--sleep=3", "--exit=1"))
  fast = runner.Job(run("cold_b"), ())
  arms = [runner.Job(run("a1"), (), cold_start=slow_bad.workdir),
          runner.Job(run("b1"), (), cold_start=fast.workdir),
          runner.Job(run("b2"), (), cold_start=fast.workdir)]
  with pytest.raises(RuntimeError, match=r"2 run\(s\) failed:\n.*cold_a failed \(exit 1\)"
                     r".*\n.*a1 not run: its cold start .*cold_a did not finish"):
    runner.run_jobs([slow_bad, fast, *arms], base_config="configs/smoke.py", root=str(ROOT),
                    max_jobs=2, desc="t", progress=False)
  read = lambda name, what: float((tmp_path / name / what).read_text())
  assert read("b1", "started") < read("cold_a", "ended")  # did not wait for the other start
  assert [j.done for j in arms] == [False, True, True]
  assert not (tmp_path / "a1" / "started").exists()


def test_a_stopped_grid_passes_sigterm_on_and_resumes_later(tmp_path, monkeypatch):
  # A fake train.py that asks the grid to stop (as a preemption would), then, on SIGTERM,
  # "saves a checkpoint" and exits with the signal's status, as train.py does.
  code = """import os, signal, sys, time
workdir = sys.argv[-1].split("=", 1)[1]
def stop(signum, frame):
  open(os.path.join(workdir, "checkpointed"), "w").close()
  sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
os.kill(os.getppid(), signal.SIGTERM)
time.sleep(60)"""
  popen = subprocess.Popen
  monkeypatch.setattr(runner.subprocess, "Popen",
                      lambda cmd, **kw: popen([sys.executable, "-c", code, *cmd[2:]], **kw))
  jobs = [runner.Job(str(tmp_path / f"run_{k}"), ()) for k in range(3)]
  with pytest.raises(errors.RunStopped, match="SIGTERM: 2 running run.s. saved a checkpoint "
                     "and stopped, 1 not started; run the same command") as stopped:
    runner.run_jobs(jobs, base_config="configs/smoke.py", root=str(ROOT), max_jobs=2,
                    desc="t", progress=False)
  assert stopped.value.status == 128 + signal.SIGTERM
  assert [(tmp_path / f"run_{k}" / "checkpointed").exists() for k in range(3)] == [
      True, True, False]
  assert not any(j.done for j in jobs)  # no summary: a rerun resumes them
