"""Runs a test program on 8 fake CPU devices in a child process (the device count is fixed
when JAX starts, so a mesh test cannot share the pytest process)."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
# The suite is dominated by XLA:CPU compiles of small programs. LLVM -O0, the classic
# (non-MLIR) fusion emitters and one codegen thread compile ~4x faster than the defaults
# (measured on the rl_step program: 7.8 s -> 2.1 s); fast-math stays off, so the numerics
# are IEEE either way, and every test compares paths compiled alike. The test processes
# and every program they start use these flags (conftest.py).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1")


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS for a child process with `num_devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}"


XLA_FLAGS = xla_flags(8)


def run(program: pathlib.Path, *args: str, timeout: int = 600, num_devices: int = 8) -> dict:
  """The JSON object the program prints last; asserts it exited 0."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(num_devices),
         "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
  code = (f"import runpy, sys; sys.argv = {[str(program), *args]!r}; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
