"""Lowers every program of the 30B presets' meshes, with a scaled-down model, for TPU and
GPU (run by lowering_test.py on as many fake CPU devices as the preset has chips).

argv[1]: the preset (v5p: fsdp 16 x expert 8 on 128 devices; h100: fsdp 8). Each MoE kernel
a user would pick there, replay on and off. Prints one JSON line:
{case: {program: {platform: {"ok": bool, "error": str, "ops": [custom calls and
collectives the test reads]}}}}.
"""
import json
import pathlib
import re
import sys

import jax

from minirl_jax import config_base
from minirl_jax.rl import programs
from minirl_jax import sharding
from minirl_jax.rl import settings as settings_lib

PRESETS_FILE = pathlib.Path(__file__).parents[1] / "configs" / "qwen3_30b_a3b_math.py"

# The preset's mesh, micro-batches, slots and chunks; a model small enough to trace fast,
# with experts that split over the v5p preset's expert axis (16 / 8) and top-k 4.
# XLA's attention: the Pallas kernels these tests look for are the MoE's (flash attention is
# compiled in tests/aot_test.py, and the full-size preset lowers with it below).
MODEL = dict(vocab_size=1024, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=64, num_experts=16, top_k=4, expert_ffn_dim=128, moe_layers_skip=(),
             attention_impl="xla")
CASES = {
    "ragged_dot": dict(moe_impl="ragged_dot"),
    "blocks": dict(moe_impl="blocks"),
    "megablox": dict(moe_impl="megablox"),
    "megablox_r3": dict(moe_impl="megablox", routing_replay="r3"),
}
PLATFORMS = ("tpu", "cuda")
# How each op shows in a lowered module's text.
WATCHED = {"ragged_all_to_all": r"custom_call @ragged_all_to_all",
           "all_to_all": r"stablehlo\.all_to_all", "tpu_custom_call": r"@tpu_custom_call",
           "ragged_dot": r"chlo\.ragged_dot"}


def _settings(preset, case):
  config = config_base.sibling(str(PRESETS_FILE), PRESETS_FILE.stem, preset)
  config.model.update(MODEL, moe_impl=case["moe_impl"])
  # Shapes only, so the preset's batch stays; shorter sequences keep tracing quick.
  config.data.max_prompt_len = 128
  config.sampler.max_new_tokens = 256
  config.model.update(attention_chunk=64, logits_chunk=64)
  config.rl.routing_replay = case.get("routing_replay", "none")
  # The preset starts from a cold-start checkpoint; one SFT step puts its program in.
  config.sft.update(max_steps=1, batch_size=config.rl.mini_batch_size, micro_batch_size=0)
  return settings_lib.from_config(config)


def _summary(text):
  if text.startswith("error: "):
    return {"ok": False, "error": text[len("error: "):], "ops": []}
  return {"ok": True, "error": "",
          "ops": sorted(op for op, pattern in WATCHED.items() if re.search(pattern, text))}


def main():
  preset = sys.argv[1]
  out = {}
  for name, case in CASES.items():
    s = _settings(preset, case)
    mesh = sharding.make_mesh(s.mesh)
    # CPU too for one case: the expert exchange XLA:CPU runs is the padded one.
    platforms = PLATFORMS + (("cpu",) if name == "blocks" else ())
    lowered = programs.lower_all(s, mesh, platforms)
    out[name] = {program: {p: _summary(t) for p, t in by_platform.items()}
                 for program, by_platform in lowered.items()}
  out["devices"] = jax.device_count()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
