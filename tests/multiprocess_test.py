"""Multi-host for real: two JAX processes (2 CPU devices each, gloo collectives, a localhost
coordinator) share one 4-device mesh for global batches, reductions and a whole resumed Run."""
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
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         # LLVM -O0: a third of the compile time; the checks are about placement and values.
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
                      "--xla_backend_optimization_level=0"}
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


# --- the child programs --------------------------------------------------------------------

def _child_data(pid):
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  from minirl_jax import objectives
  from minirl_jax import sharding
  from minirl_jax.rl import data as rl_data

  spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  local = GLOBAL_X[2 * pid:2 * pid + 2]
  out = {}
  mesh = sharding.make_mesh({"data": -1})
  out["process"] = [jax.process_index(), jax.process_count()]
  out["devices"] = [jax.device_count(), jax.local_device_count()]
  out["mesh"] = dict(mesh.shape)
  out["mesh_processes"] = [d.process_index for d in mesh.devices.ravel()]

  placed = sharding.shard_batch({"x": local, "n": np.float32(3),
                                 "routing": local[None, :, :, None]}, mesh)
  out["shard_batch"] = dict(shape=list(placed["x"].shape), spec=spec(placed["x"]),
                            gathered=gather(placed["x"]).tolist(), scalar=float(placed["n"]),
                            routing_spec=spec(placed["routing"]),
                            routing_gathered=gather(placed["routing"])[0, :, :, 0].tolist())

  x = rl_data.to_global(local, mesh)
  out["round_trip"] = dict(shape=list(x.shape), back=rl_data.local_rows(x).tolist(),
                           shard_batch_back=rl_data.local_rows(placed["x"]).tolist())
  # tensor=2 within each process: both local devices hold the same rows.
  mesh_dt = sharding.make_mesh({"data": 2, "tensor": 2})
  x_dt = rl_data.to_global(local, mesh_dt)
  out["replicated_round_trip"] = dict(
      mesh_processes=[d.process_index for d in mesh_dt.devices.ravel()],
      gathered=gather(x_dt).tolist(), back=rl_data.local_rows(x_dt).tolist())

  got = {"sum": float(jax.jit(jnp.sum)(x)),
         "col_sum": gather(jax.jit(lambda a: jnp.sum(a, axis=0))(x)).tolist()}
  rewards = rl_data.to_global(GLOBAL_REWARDS[2 * pid:2 * pid + 2], mesh)
  for norm in (False, True):
    adv = jax.jit(objectives.group_advantages, static_argnums=(1, 2))(rewards, 2, norm)
    got[f"advantages_{norm}"] = gather(adv).tolist()
    got[f"advantages_local_{norm}"] = rl_data.local_rows(adv).tolist()
  out["reductions"] = got
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
    # With async dispatch, the resumed run's many small eager ops on global arrays (all
    # compiled already, so dispatch runs far ahead) sometimes deadlocked XLA:CPU on a busy
    # machine: one device's launch blocked on its in-flight semaphore while the other
    # processes waited in a gloo all-reduce (gdb stacks; 3 of 5 `pytest -n 2` runs).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
                               process_id=pid, initialization_timeout=60,
                               coordinator_bind_address=f"127.0.0.1:{port}")
    out = _child_data(pid)
    with open(results_path, "w") as f:
      json.dump(out, f)
    jax.distributed.shutdown()
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)  # not shutdown(): it waits for peers that may be stuck in a collective
