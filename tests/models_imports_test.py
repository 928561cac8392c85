"""`minirl_jax.models` is pure: no file I/O, no checkpointing, no checkpoint file formats."""
import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
MODELS = ROOT / "minirl_jax" / "models"
# Modules that do file I/O; models/ must not import them, directly or through another module.
IO_MODULES = ("os", "shutil", "glob", "pathlib", "io", "tempfile", "safetensors", "orbax",
              "minirl_jax.checkpoint", "minirl_jax.hf_io")

_IMPORT_ALL = """
import importlib, pkgutil, sys
import minirl_jax.models as models
for info in pkgutil.iter_modules(models.__path__):
  importlib.import_module("minirl_jax.models." + info.name)
banned = ("minirl_jax.checkpoint", "minirl_jax.hf_io", "orbax", "safetensors")
print([m for m in banned if m in sys.modules])
"""


def _imported_names(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _is_io(name):
  return any(name == m or name.startswith(m + ".") for m in IO_MODULES)


def test_models_modules_neither_import_io_nor_call_open():
  offenders = []
  for path in sorted(MODELS.glob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    offenders += [f"{path.name}: import {n}" for n in _imported_names(tree) if _is_io(n)]
    offenders += [f"{path.name}:{node.lineno}: open()" for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == "open"]
  assert not offenders


def test_importing_models_loads_no_checkpoint_or_file_format_module():
  # A fresh interpreter: other tests' imports would hide a transitive import.
  result = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "[]"
