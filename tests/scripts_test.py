"""The command-line tools a user runs first, as subprocesses."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def _last_json(args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT / "tests", check=True,
                       capture_output=True, text=True, timeout=300).stdout
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
