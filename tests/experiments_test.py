"""Ablation grids: arms, the collapse criterion, tables and figures, and the quick grid end to
end as separate processes (resumable)."""
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from minirl_jax import config_base
from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax.experiments import early_warning
from minirl_jax.experiments import figures
from minirl_jax.experiments import grids
from minirl_jax.experiments import report
from minirl_jax.experiments import runner

ROOT = pathlib.Path(__file__).parents[1]


def _write_run(run_dir, records, wall_s=10.0):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"stage": "rl", **r}) + "\n" for r in records)
  with open(os.path.join(run_dir, runner.SUMMARY), "w") as f:
    json.dump({"wall_s": wall_s}, f)


def _rl(step, acc=None, entropy=0.3, kl=1e-3, reward=0.5, skipped=0.0, staleness=0.0):
  r = {"step": step, "policy/entropy": entropy, "mismatch/kl_k3": kl,
       "reward/mean": reward, "optim/skipped": skipped,
       "staleness/abs_log_pi_pi_old": staleness}
  return r | ({"eval/accuracy": acc} if acc is not None else {})


def test_table_aggregates_seeds(tmp_path):
  grid = grids.Grid("t", "configs/smoke.py",
                    tuple(grids.Arm(name) for name in ("a", "b", "c", "never_ran")), "test")
  for seed, (peak, final) in enumerate(((0.4, 0.3), (0.6, 0.5))):
    _write_run(tmp_path / "a" / f"seed_{seed}", [
        {"step": 0, "eval/accuracy": 0.2}, _rl(1, acc=peak, kl=2e-3, staleness=0.02 * seed),
        _rl(2, acc=final, staleness=0.01)])
    _write_run(tmp_path / "b" / f"seed_{seed}", [
        {"step": 0, "eval/accuracy": 0.2}, _rl(1, acc=0.5), _rl(2, acc=0.1, entropy=0.5)])
  # c: seed 0 finished, seed 1 interrupted (no summary); a grid cut short reports what it has
  _write_run(tmp_path / "c" / "seed_0", [{"step": 0, "eval/accuracy": 0.2}, _rl(1, acc=0.7)])
  _write_run(tmp_path / "c" / "seed_1", [{"step": 0, "eval/accuracy": 0.2}])
  os.remove(tmp_path / "c" / "seed_1" / runner.SUMMARY)
  runs = report.load(report.finished_runs(grid, 2, str(tmp_path)))
  rows = {r.arm: r for r in report.write_table(runs, str(tmp_path))}
  assert list(rows) == ["a", "b", "c"] and rows["c"].seeds == 1
  assert rows["c"].peak_accuracy == pytest.approx(0.7)
  a, b = rows["a"], rows["b"]
  assert (a.start_accuracy, a.peak_accuracy, a.final_accuracy) == pytest.approx((0.2, 0.5, 0.4))
  assert a.peak_accuracy_std == pytest.approx(0.1) and a.max_kl == pytest.approx(2e-3)
  assert a.max_staleness == pytest.approx((0.01 + 0.02) / 2)  # per run max, then the mean
  assert a.collapsed == 0 and b.collapsed == 2 and b.collapse_step_median == 2
  assert b.final_entropy == pytest.approx(0.5) and a.wall_s == 10.0
  with open(tmp_path / "table.csv") as f:
    assert [r["arm"] for r in csv.DictReader(f)] == ["a", "b", "c"]
  assert ("| b | 2 | 0.200 ± 0.000 | 0.500 ± 0.000 | 0.100 ± 0.000 | 2/2 (2) | 0.5 | "
          "1.00e-03 | 0.00e+00 | 10 |") in (tmp_path / "table.md").read_text()


def test_series_keeps_every_runs_steps(tmp_path):
  _write_run(tmp_path / "a" / "seed_0", [{"step": 0, "eval/accuracy": 0.25},
                                         _rl(1, kl=2.5e-3), _rl(2, acc=0.375, entropy=0.125)])
  runs = report.load({"a": [str(tmp_path / "a" / "seed_0")]})
  with open(report.write_series(runs, str(tmp_path))) as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["step"]) for r in rows] == [("a/seed_0", "0"), ("a/seed_0", "1"),
                                                   ("a/seed_0", "2")]
  assert [r["eval/accuracy"] for r in rows] == ["0.25", "", "0.375"]
  assert rows[1]["mismatch/kl_k3"] == "0.0025" and rows[2]["policy/entropy"] == "0.125"
  assert rows[0]["policy/entropy"] == "" and rows[2]["is/seq_frac_masked"] == ""


def test_a_committed_report_restores_its_runs_for_the_next_machine(tmp_path):
  grid = grids.Grid("t", "configs/smoke.py", (grids.Arm("a"), grids.Arm("b")), "test")
  made = tmp_path / "made"
  for seed in range(2):
    _write_run(made / "a" / f"seed_{seed}", [
        {"step": 0, "eval/accuracy": 0.25}, _rl(1, kl=1 / 3, staleness=0.01 * seed),
        _rl(2, acc=0.375 + 0.125 * seed, entropy=0.01)], wall_s=10.0 + seed)
  _write_run(made / "b" / "seed_0", [{"step": 0, "eval/accuracy": 0.25}, _rl(1, acc=0.5)])
  results = tmp_path / "results"
  os.makedirs(results)
  runs = report.load(report.finished_runs(grid, 2, str(made)))
  report.write_table(runs, str(results))
  report.write_series(runs, str(results))
  workdir = tmp_path / "next_machine"
  _write_run(workdir / "b" / "seed_0", [{"step": 0, "eval/accuracy": 0.75}])  # kept as is
  assert report.restore(grid, str(results), str(workdir)) == [
      str(workdir / "a" / "seed_0"), str(workdir / "a" / "seed_1")]
  assert runner.done(str(workdir / "a" / "seed_1"))
  restored = report.load(report.finished_runs(grid, 2, str(workdir)))
  a0 = restored[0]
  assert (a0.name, a0.seed, a0.collapse_step) == ("a/seed_0", 0, 2)  # entropy under the floor
  assert a0.records[1]["mismatch/kl_k3"] == pytest.approx(1 / 3, rel=1e-6)  # 6 digits kept
  assert a0.accuracies == [0.25, 0.375] and restored[1].accuracies == [0.25, 0.5]
  assert [r.wall_s for r in restored] == [10.5, 10.5, 10.0]  # the arm's mean: it stays
  assert restored[2].accuracies == [0.75]
  other = grids.Grid("other", "configs/smoke.py", (grids.Arm("a"),), "test")
  with pytest.raises(errors.UserError, match="run b/seed_0 is not an arm of grid other"):
    report.restore(other, str(results), str(tmp_path / "x"))
  with pytest.raises(errors.UserError, match="no .*missing.table.csv"):
    report.restore(grid, str(tmp_path / "missing"), str(tmp_path / "x"))


def test_levels_group_level_variant_arms_in_grid_order(tmp_path):
  row = lambda arm, acc: report.ArmRow(arm, 3, 0.3, 0.0, acc, 0.0, acc, 0.01, 0, None, 0.05,
                                       1e-3, 0.0, 9.0)
  rows = [row("zero/minirl", 0.4), row("zero/no_is", 0.3), row("int4/minirl", 0.2),
          row("int4/no_is", 0.1), row("int4/seq", 0.25)]
  levels, variants = figures.by_level(rows)
  assert levels == ["zero", "int4"] and list(variants) == ["minirl", "no_is", "seq"]
  assert [(x, r.final_accuracy) for x, r in variants["no_is"]] == [(0, 0.3), (1, 0.1)]
  assert [x for x, _ in variants["seq"]] == [1]
  assert figures.by_level(rows + [row("plain_arm", 0.5)]) is None  # not a levelled grid
  assert figures.plot_levels(rows, str(tmp_path / "levels.png")) == str(tmp_path / "levels.png")
  assert (tmp_path / "levels.png").stat().st_size > 0


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
  capped = grids.Grid("capped", "configs/smoke.py", (grids.Arm("a", seeds=1), grids.Arm("b")),
                       "test")
  _, arms = runner.plan(capped, 3, str(tmp_path))
  assert [j.workdir for j in arms] == [str(tmp_path / a / f"seed_{s}")
                                       for a, s in (("a", 0), ("b", 0), ("b", 1), ("b", 2))]
  assert grids.flags({"objective.clip": False, "rl.steps": 2}) == [
      "--config.objective.clip=False", "--config.rl.steps=2"]


def test_offpolicy_arms_keep_the_mini_batch_and_grow_n():
  arms = grids.get("offpolicy").arms
  assert len(arms) == 15
  for arm in arms:
    n, recipe = arm.name.split("/")
    o = arm.overrides
    assert o["rl.mini_batch_size"] == 32 and o["rl.prompts_per_step"] * 8 == int(n[1:]) * 32
    assert o["objective.name"] == "minirl"
    assert o.get("objective.clip", True) == ("no_clip" not in recipe)
    replay = "r2" if "+r2" in recipe else "r3" if "+r3" in recipe else None
    assert o.get("rl.routing_replay") == replay


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
  os.remove(arm_dir / runner.SUMMARY)
  finished = os.path.getmtime(tmp_path / "minirl_no_is" / "seed_0" / runner.SUMMARY)
  subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
  assert (arm_dir / "metrics.jsonl").read_text() == before
  assert os.path.getmtime(tmp_path / "minirl_no_is" / "seed_0" / runner.SUMMARY) == finished


def test_gap_grid_pairs_minirl_and_no_is_at_every_level_from_zero():
  arms = {a.name: a.overrides for a in grids.get("gap").arms}
  levels = [name.split("/")[0] for name in arms][:14:2]
  assert levels == ["zero", "float32", "float16", "bfloat16", "int8", "fp8", "int4"]
  # the head-to-head at the widest gap: token-level IS vs sequence-level and geometric
  assert list(arms)[-2:] == ["int4/minirl_seq_tis", "int4/minirl_geo_mis"]
  assert arms["int4/minirl_geo_mis"]["objective.is_level"] == "geometric"
  assert arms["int4/minirl_seq_tis"]["sampler.dtype"] == "int4"
  assert arms["zero/minirl"]["objective.behaviour_logp"] == "pi_old"
  assert arms["int4/minirl_no_is"]["objective.train_infer_is"] is False
  assert arms["int4/minirl_no_is"]["sampler.dtype"] == "int4"


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
  assert stopped.done and report.runner_summary(stopped.workdir) == {
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


def test_early_warning_leads_by_the_stated_thresholds(tmp_path):
  # Baseline (steps 1-5): first-order error 0.1, cosine 0.95, KL 1e-3, entropy 0.4.
  records = [{"step": 0, "eval/accuracy": 0.3}]
  for step in range(1, 21):
    records.append({"step": step, "policy/entropy": 0.4 if step < 16 else 0.15,
                    "mismatch/kl_k3": 1e-3, "reward/mean": 0.5,
                    "is/first_order_error": 0.1 if step < 9 else 0.25,  # x2.5 at step 9
                    "optim/skipped": 0.0})
    if step % 2 == 0:
      records[-1]["is/grad_cosine_token_seq_last"] = 0.95 if step < 12 else 0.85  # 1-c x3
    if step % 5 == 0:
      records[-1]["eval/accuracy"] = {5: 0.4, 10: 0.42, 15: 0.4, 20: 0.1}[step]
  _write_run(tmp_path / "arm" / "seed_0", records)
  _write_run(tmp_path / "calm" / "seed_0", [
      {"step": 0, "eval/accuracy": 0.3}, _rl(1, acc=0.3), _rl(2, acc=0.31)])
  # never collapses, but its KL rises x5 after the baseline window: a false alarm
  _write_run(tmp_path / "calm" / "seed_1", [{"step": 0, "eval/accuracy": 0.3}] + [
      _rl(step, acc=0.3 if step % 5 == 0 else None, kl=1e-3 if step <= 5 else 5e-3)
      for step in range(1, 11)])
  runs = {"arm": [str(tmp_path / "arm" / "seed_0")],
          "calm": [str(tmp_path / "calm" / "seed_0"), str(tmp_path / "calm" / "seed_1")]}
  leads = early_warning.warnings_for(report.load(runs))
  assert len(leads) == 1 and leads[0].run == "arm/seed_0" and leads[0].collapse_step == 20
  assert leads[0].leads == {"is/first_order_error": 11, "is/grad_cosine_token_seq_last": 8,
                            "mismatch/kl_k3": None, "policy/entropy": 4}
  out = early_warning.write(report.load(runs), str(tmp_path))
  assert "| arm/seed_0 | 20 | +11 | +8 | never | +4 |" in open(out["early_warning_md"]).read()
  assert out["false_alarms"]["mismatch/kl_k3"] == (1, 2)  # calm/seed_1's KL
  assert out["false_alarms"]["policy/entropy"] == (0, 2)
  assert "| runs that never collapsed: crossed anyway | - | 0/2 | 0/2 | 1/2 | 0/2 |" in (
      open(out["early_warning_md"]).read())
  assert os.path.getsize(out["early_warning_figure"]) > 10_000


def test_a_signal_logged_every_10_steps_takes_its_first_value_as_baseline():
  series = [(10, 0.01), (20, 0.015), (30, 0.03)]  # 1 - cosine at steps 10, 20, 30
  assert early_warning.baseline(series) == (0.01, 10)
  assert early_warning.baseline([(2, 0.1), (4, 0.3), (6, 5.0)]) == (pytest.approx(0.2), 5)
  assert early_warning.baseline([]) is None
  records = [{"step": s, "is/grad_cosine_token_seq_last": 1 - v} for s, v in series]
  assert early_warning.crossing_step(records, "is/grad_cosine_token_seq_last",
                                     lambda v: 1.0 - v) == 30


def test_series_keep_the_digits_the_early_warning_reads(tmp_path):
  """1 - cosine is what the early warning reads: a cosine near 1 keeps 9 digits (any float32
  exactly), the other metrics 6."""
  cos = float(np.float32(0.99999912))
  run = report.Run("a", "a/seed_0", 0, [
      {"step": 1, "is/grad_cosine_token_seq_last": cos, "mismatch/kl_k3": 1 / 3}], None, 1.0)
  back = report.read_series(report.write_series([run], str(tmp_path)))["a/seed_0"][0]
  assert np.float32(back["is/grad_cosine_token_seq_last"]) == np.float32(cos)
  assert 1 - back["is/grad_cosine_token_seq_last"] == pytest.approx(1 - cos, rel=1e-4)
  assert back["mismatch/kl_k3"] == 0.333333
  acc = report.Run("a", "a/seed_0", 0, [{"step": 0, "eval/accuracy": 34 / 128},
                                        {"step": 10, "eval/accuracy": 17 / 128}], None, 1.0)
  back = report.read_series(report.write_series([acc], str(tmp_path)))["a/seed_0"]
  assert [r["eval/accuracy"] for r in back] == [34 / 128, 17 / 128]  # exactly half: no collapse
  assert collapse.collapse_step(back) is None


@pytest.mark.parametrize("name", sorted(grids.GRIDS))
def test_every_arm_is_a_valid_config(name):
  """Each arm's overrides (cold start and RL) on its grid's base config build valid
  settings: a typo in a grid fails here, not hours into a run."""
  from minirl_jax.rl import settings as settings_lib
  grid = grids.get(name)
  for arm in grid.arms:
    config = config_base.sibling(str(ROOT / grid.base_config), pathlib.Path(
        grid.base_config).stem)
    grids.apply(config, {**arm.cold_start, **arm.overrides})
    s = settings_lib.from_config(config)
    assert s.rl.global_batch % s.rl.mini_batch_size == 0, arm.name
  if name == "round2":
    n8 = [arm for arm in grid.arms if arm.name.startswith("n8/")]
    for arm in n8:  # N = 8 at the on-policy global batch: only the mini-batch changes
      config = grids.apply(config_base.sibling(str(ROOT / grid.base_config), "paper_moe"),
                           arm.overrides)
      s = settings_lib.from_config(config)
      assert (s.rl.global_batch, s.rl.num_minibatches) == (64, 8), arm.name
    for arm in (arm for arm in grid.arms if arm.name.startswith("n2/")):
      config = grids.apply(config_base.sibling(str(ROOT / grid.base_config), "paper_moe"),
                           arm.overrides)
      s = settings_lib.from_config(config)
      assert (s.rl.global_batch, s.rl.num_minibatches) == (64, 2), arm.name
