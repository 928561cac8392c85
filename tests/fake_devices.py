"""Runs a test program on 8 fake CPU devices in a child process (the device count is fixed
when JAX starts, so a mesh test cannot share the pytest process)."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
# LLVM -O0: a third of the compile time; partitioning (what these programs test) is HLO-level.
XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


def run(program: pathlib.Path, *args: str, timeout: int = 600) -> dict:
  """The JSON object the program prints last; asserts it exited 0."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAGS}
  code = f"import runpy, sys; sys.argv = {[str(program), *args]!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
