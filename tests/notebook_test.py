"""The Colab quickstart runs: every code cell, in order, in one namespace."""
import json
import os
import pathlib

import matplotlib

ROOT = pathlib.Path(__file__).parents[1]


def test_quickstart_notebook_runs(monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(ROOT)
  notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
  namespace = {}
  for cell in notebook["cells"]:
    if cell["cell_type"] != "code":
      continue
    source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!")))
    exec(compile(source, "quickstart.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["summary"]["rl_steps"] == 4
  assert "mismatch/kl_mu_pi_old" in namespace["rl"][0]
  assert float(namespace["kl"]) != 0.0  # int8 sampling really differs from the trainer
  assert os.path.exists(os.path.join(namespace["workdir"], "metrics.jsonl"))
