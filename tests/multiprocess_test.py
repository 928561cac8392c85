"""Multi-host for real: two JAX processes (2 CPU devices each, gloo collectives, a localhost
coordinator) share one 4-device mesh for global batches, reductions and a whole resumed Run."""
import dataclasses
import faulthandler
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
TIMEOUT_S = 240
# The known global batch: process p holds rows [2p, 2p + 2).
GLOBAL_X = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
# One group of 2 rewards per process.
GLOBAL_REWARDS = np.array([1.0, 0.0, 0.25, 0.75], np.float32)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _stderr(paths) -> str:
  return "\n".join(f"--- {p.name}:\n" + "\n".join(
      line for line in p.read_text().splitlines() if not line.startswith("[Gloo]"))[-4000:]
                   for p in paths)


def _launch(tmp, mode, workdir=None):
  """Runs both processes of one child program; returns each one's results (a dict).

  A child exits at its first error (its peer then fails in its next collective or is killed),
  so a failing check fails the test with both processes' stderr instead of hanging.
  """
  import fake_devices  # here: the children import this file from elsewhere
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": fake_devices.xla_flags(LOCAL_DEVICES)}
  port, procs = _free_port(), []
  results = [tmp / f"{mode}{pid}.json" for pid in range(NUM_PROCESSES)]
  errs = [tmp / f"{mode}{pid}.err" for pid in range(NUM_PROCESSES)]
  try:
    for pid in range(NUM_PROCESSES):
      # `-c` (not a script path): spawned reward workers do not re-import this file.
      code = (f"import importlib.util as u; s = u.spec_from_file_location('child', {__file__!r})"
              f"; m = u.module_from_spec(s); s.loader.exec_module(m)"
              f"; m.child_main({mode!r}, {pid}, {port}, {workdir!r}, {str(results[pid])!r})")
      with open(tmp / f"{mode}{pid}.out", "w") as out, open(errs[pid], "w") as err:
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      stdout=out, stderr=err))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
      if time.monotonic() > deadline:
        pytest.fail(f"{mode} children timed out after {TIMEOUT_S}s\n{_stderr(errs)}")
      time.sleep(0.1)
    for proc in procs:  # a failed process's peer soon notices; its stderr says where it was
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert all(p.returncode == 0 for p in procs), (
        f"{mode} children exited with {[p.returncode for p in procs]}\n{_stderr(errs)}")
    return [json.loads(r.read_text()) for r in results]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


# --- the data path -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_children(tmp_path_factory):
  return _launch(tmp_path_factory.mktemp("multiprocess_data"), "data")


def test_two_processes_form_one_four_device_mesh(data_children):
  for pid, out in enumerate(data_children):
    assert out["process"] == [pid, NUM_PROCESSES]
    assert out["devices"] == [NUM_PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES]
    assert out["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    # Each process owns a contiguous block of the data axis: rows [2p, 2p + 2).
    assert out["mesh_processes"] == [0, 0, 1, 1]


def test_shard_batch_assembles_process_rows_into_the_global_batch(data_children):
  for out in data_children:
    got = out["shard_batch"]
    assert got["shape"] == list(GLOBAL_X.shape) and got["spec"] == ["data", None]
    assert got["gathered"] == GLOBAL_X.tolist()
    assert got["scalar"] == 3.0
    # routing is [L, B, T, k]: its batch axis is 1.
    assert got["routing_spec"] == [None, "data", None, None]
    assert got["routing_gathered"] == GLOBAL_X.tolist()


def test_to_global_and_local_rows_round_trip(data_children):
  for pid, out in enumerate(data_children):
    rows = GLOBAL_X[2 * pid:2 * pid + 2].tolist()
    assert out["round_trip"] == {"shape": list(GLOBAL_X.shape), "back": rows,
                                 "shard_batch_back": rows}


def test_round_trip_when_local_devices_replicate_rows(data_children):
  for pid, out in enumerate(data_children):
    got = out["replicated_round_trip"]
    assert got["mesh_processes"] == [0, 0, 1, 1]  # [data, tensor] = [[p0, p0], [p1, p1]]
    assert got["gathered"] == GLOBAL_X.tolist()
    assert got["back"] == GLOBAL_X[2 * pid:2 * pid + 2].tolist()


def test_jitted_reductions_agree_across_processes_and_with_numpy(data_children):
  def want_advantages(normalize_std):
    groups = GLOBAL_REWARDS.reshape(-1, 2)
    centred = groups - groups.mean(axis=1, keepdims=True)
    return (centred / groups.std(axis=1, keepdims=True) if normalize_std else centred).ravel()

  for pid, out in enumerate(data_children):
    got = out["reductions"]
    assert got["sum"] == pytest.approx(float(GLOBAL_X.sum()))
    assert got["col_sum"] == pytest.approx(GLOBAL_X.sum(axis=0).tolist())
    for norm in (False, True):
      want = want_advantages(norm)
      np.testing.assert_allclose(got[f"advantages_{norm}"], want, rtol=1e-6)
      np.testing.assert_allclose(got[f"advantages_local_{norm}"], want[2 * pid:2 * pid + 2],
                                 rtol=1e-6)
  same = lambda out: {k: v for k, v in out["reductions"].items() if "local" not in k}
  assert same(data_children[0]) == same(data_children[1])


# --- a whole Run, then the same command resumed, in one shared workdir ----------------------

@pytest.fixture(scope="module")
def run_children(tmp_path_factory):
  """Each process's results of a Run and of the same command again (resumed), launched one
  after the other on one shared workdir; and that workdir."""
  tmp = tmp_path_factory.mktemp("multiprocess_run")
  workdir = str(tmp / "workdir")
  return _launch(tmp, "run", workdir), _launch(tmp, "resume", workdir), tmp / "workdir"


def test_run_then_resume_on_two_processes(run_children):
  run, resume, workdir = run_children
  assert run[0]["summary"] == run[1]["summary"]
  assert run[0]["summary"]["sft_steps"] == 2 and run[0]["summary"]["rl_steps"] == 1
  # The second launch restored the shared checkpoint (SFT done, RL step 1) on both.
  assert resume[0]["restored"] == resume[1]["restored"] == {
      "sft_step": 2, "sft_done": True, "rl_step": 1,
      "start_accuracy": run[0]["summary"]["accuracy_after_sft"]}
  assert resume[0]["summary"] == resume[1]["summary"]
  assert resume[0]["summary"]["sft_steps"] == 2 and resume[0]["summary"]["rl_steps"] == 2
  # Process 0 alone writes the shared metrics: every step once, across both launches.
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["stage"], r["step"]) for r in records] == [
      ("sft", 1), ("sft", 2), ("rl", 0), ("rl", 1), ("rl", 2)]


# --- the child programs --------------------------------------------------------------------

def _child_data(pid):
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  import flax

  from minirl_jax import batch as batch_lib
  from minirl_jax import objectives
  from minirl_jax import sharding
  from minirl_jax.rl import rollout

  @flax.struct.dataclass
  class Record:  # rows on a declared axis: routing's batch axis is 1
    x: jax.Array = batch_lib.field("batch", "time")
    n: jax.Array = batch_lib.field()
    routing: jax.Array = batch_lib.field("layers", "batch", "time", "top_k")

  spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  local = GLOBAL_X[2 * pid:2 * pid + 2]
  out = {}
  mesh = sharding.make_mesh({"data": -1})
  out["process"] = [jax.process_index(), jax.process_count()]
  out["devices"] = [jax.device_count(), jax.local_device_count()]
  out["mesh"] = dict(mesh.shape)
  out["mesh_processes"] = [d.process_index for d in mesh.devices.ravel()]

  placed = sharding.shard_batch(Record(x=local, n=np.float32(3),
                                       routing=local[None, :, :, None]), mesh)
  out["shard_batch"] = dict(shape=list(placed.x.shape), spec=spec(placed.x),
                            gathered=gather(placed.x).tolist(), scalar=float(placed.n),
                            routing_spec=spec(placed.routing),
                            routing_gathered=gather(placed.routing)[0, :, :, 0].tolist())

  x = rollout.to_global(local, mesh)
  out["round_trip"] = dict(shape=list(x.shape), back=rollout.local_rows(x).tolist(),
                           shard_batch_back=rollout.local_rows(placed.x).tolist())
  # tensor=2 within each process: both local devices hold the same rows.
  mesh_dt = sharding.make_mesh({"data": 2, "tensor": 2})
  x_dt = rollout.to_global(local, mesh_dt)
  out["replicated_round_trip"] = dict(
      mesh_processes=[d.process_index for d in mesh_dt.devices.ravel()],
      gathered=gather(x_dt).tolist(), back=rollout.local_rows(x_dt).tolist())

  got = {"sum": float(jax.jit(jnp.sum)(x)),
         "col_sum": gather(jax.jit(lambda a: jnp.sum(a, axis=0))(x)).tolist()}
  rewards = rollout.to_global(GLOBAL_REWARDS[2 * pid:2 * pid + 2], mesh)
  for norm in (False, True):
    adv = jax.jit(objectives.group_advantages, static_argnums=(1, 2))(rewards, 2, norm)
    got[f"advantages_{norm}"] = gather(adv).tolist()
    got[f"advantages_local_{norm}"] = rollout.local_rows(adv).tolist()
  out["reductions"] = got
  return out


def _child_run(workdir, rl_steps):
  """One launch of the main job. Each launch runs one RL step: a second, already compiled
  step in the same process sometimes deadlocked XLA:CPU (dozens of eager ops on global
  arrays dispatched ahead; a device's launch waits on its in-flight limit while the other
  process waits in a gloo all-reduce), 4 of 12 runs under `pytest -n 2` load."""
  import importlib.util

  from minirl_jax.rl import loop
  from minirl_jax.rl import settings

  spec = importlib.util.spec_from_file_location("smoke", ROOT / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.mesh = {"data": -1}
  # Global sizes, all multiples of the 4 devices: SFT batches of 8, 4 prompts x 4 = 16
  # rollout rows in mini-batches of 8, evaluation batches of 16.
  config.rl.steps = rl_steps
  config.sft.update(max_steps=2, eval_every=2)
  config.data.eval_size = 16
  config.log.update(progress=False, plots=False)
  run = loop.Run(settings.from_config(config), workdir)
  out = {"restored": dataclasses.asdict(run.progress) if run.restore() else None}
  out["summary"] = run.run()
  return out


def child_main(mode, pid, port, workdir, results_path):
  """One process of a child program: joins the cluster, runs its checks, writes their results
  as JSON (not to stdout: gloo prints there). Exits at once on an error."""
  faulthandler.dump_traceback_later(TIMEOUT_S - 15)  # where a hung child is stuck
  try:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(tempfile.gettempdir(), "minirl_jax_test_xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
                               process_id=pid, initialization_timeout=60,
                               coordinator_bind_address=f"127.0.0.1:{port}")
    out = (_child_data(pid) if mode == "data" else
           _child_run(workdir, rl_steps={"run": 1, "resume": 2}[mode]))
    with open(results_path, "w") as f:
      json.dump(out, f)
    jax.distributed.shutdown()
  except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)  # not shutdown(): it waits for peers that may be stuck in a collective
