"""The command-line tools a user runs first, as subprocesses."""
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parents[1]


def _last_json(args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT / "tests", check=True,
                       capture_output=True, text=True, timeout=900).stdout
  return out, json.loads(out.strip().splitlines()[-1])


def test_model_info_counts_qwen3_30b_a3b_without_allocating():
  out, info = _last_json([str(ROOT / "scripts" / "model_info.py"),
                          f"--config={ROOT / 'configs' / 'qwen3_30b_a3b.py'}"])
  # Qwen's model card: 30.5B parameters in total, 3.3B activated per token.
  assert 30.4e9 < info["params_total"] < 30.6e9
  assert 3.25e9 < info["params_active"] < 3.4e9
  assert "moe/w_gate" in out and info["num_experts"] == 128


def test_scripts_find_their_default_config_from_any_directory():
  _, info = _last_json([str(ROOT / "scripts" / "model_info.py"), "--config.model.top_k=1"])
  assert info["top_k"] == 1 and info["num_experts"] == 4  # configs/tiny.py, overridden


def _one_error_line(args):
  """Runs a script that must refuse its input: exit 2, one line, no traceback."""
  run = subprocess.run([sys.executable, *args], cwd=ROOT / "tests", capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1, run.stderr
  return lines[0]


def _preempted_train(train, workdir):
  """Starts `train`, sends SIGTERM once its first SFT step is logged; returns the result."""
  proc = subprocess.Popen(train, cwd=ROOT / "tests", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def test_train_preempted_then_eval_and_sample_the_checkpoint(tmp_path):
  smoke = [f"--config={ROOT / 'configs' / 'smoke.py'}", "--config.rl.steps=1",
           "--config.sft.max_steps=40", "--config.sft.eval_every=40",
           "--config.log.plots=False"]
  workdir = tmp_path / "run"
  train = [sys.executable, str(ROOT / "scripts" / "train.py"), *smoke, f"--workdir={workdir}"]
  # SIGTERM (preemption): the step finishes, a checkpoint is written, exit 128 + 15, one line.
  status, _, err = _preempted_train(train, workdir)
  assert status == 128 + signal.SIGTERM, err
  assert "Traceback" not in err
  stopped = err.strip().splitlines()[-1]
  step = int(re.match(r"stopped: SIGTERM after sft step (\d+): checkpoint (\d+) saved under ",
                      stopped).group(1))
  assert 1 <= step < 40 and (workdir / "checkpoints" / str(step)).is_dir()
  # The same command resumes: every SFT step logged exactly once.
  _, summary = _last_json(train[1:])
  assert summary["sft_steps"] == 40 and summary["rl_steps"] == 1
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if r["stage"] == "sft"] == list(range(1, 41))
  # Resuming with another model is refused before any checkpoint is read.
  assert _one_error_line([*train[1:], "--config.model.d_model=64"]) == (
      f"error: the config differs from the one the run in {workdir} was started with "
      "(settings.json), field: saved -> now: model.d_model: 32 -> 64. Resume with the run's "
      "config or use another --workdir")
  workdir = str(workdir)

  # eval.py and sample.py restore params and call the RL step's functions, no training run.
  _, result = _last_json([str(ROOT / "scripts" / "eval.py"), *smoke, f"--workdir={workdir}",
                          "--samples=2", "--size=16"])
  assert result["problems"] == 16 and result["rl_step"] == 1 and result["sft_step"] == 40
  assert 0.0 <= result["avg@2"] <= result["pass@2"] <= 1.0
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), *smoke,
                        f"--workdir={workdir}", "--prompts=3+4=,9-2=",
                        "--samples_per_prompt=2"], check=True, capture_output=True, text=True,
                       timeout=900).stdout
  lines = [line for line in out.splitlines() if "->" in line]
  assert len(lines) == 4 and "rl_step=1" in out

  _check_gap(workdir, smoke)

  # A workdir without a checkpoint: one line, exit 2, and nothing created.
  missing = tmp_path / "missing"
  run = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval.py"), *smoke,
                        f"--workdir={missing}"], capture_output=True, text=True, timeout=900)
  assert run.returncode == 2 and "Traceback" not in run.stderr and not missing.exists()
  assert run.stderr.strip().splitlines()[-1].startswith("error: no checkpoint under")


def test_user_errors_are_one_line_with_status_2(tmp_path):
  workdir = tmp_path / "never"
  train = [str(ROOT / "scripts" / "train.py"), f"--config={ROOT / 'configs' / 'smoke.py'}",
           f"--workdir={workdir}"]
  assert _one_error_line([*train, "--config.optim.eps=1e-50"]) == (
      "error: optim.eps is 1e-50, which is 0.0 in the parameter dtype float32")
  assert _one_error_line([*train, "--config.rl.stepz=5"]) == (
      "error: --config.rl.stepz: the config has no field rl.stepz; did you mean rl.steps?")
  not_a_model = tmp_path / "not_a_model"
  not_a_model.mkdir()
  assert _one_error_line([*train, f"--config.init_from={not_a_model}"]) == (
      f"error: init_from={not_a_model} is not a model directory: it has no "
      "model_config.json (scripts/convert_hf.py --out=DIR writes one)")
  too_long = _one_error_line([*train, "--config.sampler.max_new_tokens=100000000"])
  assert re.fullmatch(
      r"error: the memory plan \(scripts/plan.py\) puts the \w+ program at [\d.]+ GiB per "
      r"device, over the [\d.]+ GiB a cpu device has; the largest sampler.max_new_tokens "
      r"that fits is \d+", too_long), too_long
  fits = int(too_long.rsplit(" ", 1)[1])
  assert 10**4 < fits < 10**8
  assert not workdir.exists()  # refused before anything was written
  # A workdir another live process holds (tests/rl_workdir_test.py: and once it dies).
  held = tmp_path / "held"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(held)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert _one_error_line([*train, f"--workdir={held}"]) == (
        f"error: workdir {held} is in use by process {holder.pid} (it holds run.lock); wait "
        "for it to end or use another --workdir")
  finally:
    holder.kill()
    holder.wait()


_HOLD = ("import sys, time; from minirl_jax.rl import workdir; "
         "held = workdir.Claim(sys.argv[1]); print('held', flush=True); time.sleep(120)")


def _check_gap(workdir, smoke):
  """scripts/gap.py: every level on the same prompts; the zero-gap control is exactly 0."""
  out, result = _last_json([str(ROOT / "scripts" / "gap.py"), *smoke, f"--workdir={workdir}",
                            "--levels=float32,int4"])  # the ladder: sampling_test
  levels = result["levels"]
  assert list(levels) == ["zero", "float32", "int4"]
  assert result["rl_step"] == 1 and result["batches"] == 2
  table = out.strip().splitlines()[:-1]
  for level in levels:
    assert any(line.startswith(level) for line in table), level
  zero = levels["zero"]
  assert zero["kl_k1"] == zero["kl_k3"] == zero["routing_disagreement_mean"] == 0.0
  assert zero["is_max"] == 1.0 and zero["tokens"] == levels["float32"]["tokens"] > 0
  assert abs(levels["float32"]["kl_k1"]) <= 1e-5 and levels["float32"]["kl_k3"] <= 1e-5
  assert levels["int4"]["kl_k3"] > levels["float32"]["kl_k3"]
  assert len(levels["int4"]["routing_disagreement"]) == 2  # the smoke model's MoE layers


def test_bench_sampler_rollouts_count_the_row_steps_of_both_engines():
  """16 responses of imposed lengths 1, 3, 5, 2 (cycled): the static batch decodes 16 rows
  for the longest's 4 steps; 2 slots stay busy, so they waste at most the last 4 steps."""
  _, out = _last_json([str(ROOT / "scripts" / "bench_sampler.py"), "--only_rollouts",
                       f"--rollout_config={ROOT / 'configs' / 'smoke.py'}",
                       "--rollout_dtypes=float32", "--slots=2", "--repeats=1",
                       "--response_lengths=1,3,5,2"])
  rows = out["rollouts"]["rows"]
  static, slots = rows["float32/static"], rows["float32/slots2"]
  work = 4 * (0 + 2 + 4 + 1)  # tokens after each response's first (prefill samples it)
  assert static["decode_steps"] == 4 and static["wasted_row_steps"] == 16 * 4 - work
  assert slots["wasted_row_steps"] == 2 * slots["decode_steps"] - work
  assert work / 2 <= slots["decode_steps"] <= work / 2 + 4


def test_bench_device_smoke_measures_the_cpu_and_prints_its_figures():
  out, r = _last_json([str(ROOT / "scripts" / "bench_device.py"), "--smoke", "--repeats=1"])
  assert r["platform"] == "cpu" and r["peaks_source"] == "measured"
  assert r["params_total"] == 226_176  # configs/tiny.py
  train = r["train"]["blocks"]
  assert (train["rows"], train["length"]) == (8, 8 + 16)
  assert 0 < r["mfu"] <= 1 and r["mfu"] == train["mfu"]
  decode = r["decode"]
  # 4 prompts x 2 responses; the first token comes from the prefill, 15 decode steps.
  assert (decode["responses"], decode["decode_steps"]) == (8, 15)
  assert 0 < r["bandwidth_utilisation"] <= 2  # of a bandwidth measured on large arrays
  assert r["within_budget"] and "MFU" in out
