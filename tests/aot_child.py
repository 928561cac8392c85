"""Compiles every program of scaled-down configs with XLA:TPU for a 4-chip v5p slice (run by
aot_test.py in its own process: libtpu is loaded there, not in the test workers).

Each MoE kernel, replay on and off, and an expert axis (the real ragged all-to-all). Prints
one JSON line: {case: {program: {...memory, FLOPs, the ops the test reads}, "_expected":
{...}}, "oom": the one-line error of a decode loop that does not fit a v5e chip}.
"""
import dataclasses
import json

from minirl_jax import aot
from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax import plan
from minirl_jax import roofline
from minirl_jax import sharding
from minirl_jax.rl import programs
from minirl_jax.rl import settings as settings_lib

TOPOLOGY = "v5p:2x2x1"
# Experts that split over an expert axis of 2, top-4; small enough to compile in seconds.
MODEL = dict(vocab_size=1024, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=64, num_experts=8, top_k=4, expert_ffn_dim=128, moe_layers_skip=(),
             attention_chunk=64, logits_chunk=64)
MESH_FSDP = dict(data=1, fsdp=4, expert=1, tensor=1)
CASES = {
    "ragged_dot": dict(moe_impl="ragged_dot", mesh=MESH_FSDP),
    "megablox_flash_r3": dict(moe_impl="megablox", attention_impl="flash", mesh=MESH_FSDP,
                              routing_replay="r3"),
    "blocks_expert_r2": dict(moe_impl="blocks", mesh=dict(data=1, fsdp=2, expert=2, tensor=1),
                             routing_replay="r2"),
}


def _settings(case, max_new_tokens=64):
  config = config_base.get_base_config()
  config.model.update(MODEL, moe_impl=case["moe_impl"],
                      attention_impl=case.get("attention_impl", "xla"),
                      expert_exchange=case.get("expert_exchange", "ragged"))
  config.mesh.update(case["mesh"])
  config.data.max_prompt_len = 64
  config.sampler.update(max_new_tokens=max_new_tokens, prompt_bucket=64)
  config.rl.update(prompts_per_step=16, group_size=4, mini_batch_size=32,
                   routing_replay=case.get("routing_replay", "none"))
  # The SFT update compiles like the RL one: once, in the case with both Pallas kernels.
  config.sft.update(batch_size=32, micro_batch_size=0,
                    max_steps=1 if case.get("attention_impl") == "flash" else 0)
  return settings_lib.from_config(config)


def _case(case) -> dict:
  s = _settings(case)
  mesh = sharding.make_mesh(s.mesh, devices=aot.topology_devices(TOPOLOGY))
  out = {}
  for name, program in programs.build(s, mesh).items():
    c = aot.compile_program(name, program, mesh)
    out[name] = {"peak": c.peak, "arguments": c.arguments, "temporaries": c.temporaries,
                 "flops": c.flops, "compiler_flops": c.compiler_flops, "bytes": c.bytes,
                 "roofline_seconds": c.roofline_seconds, "ops": list(c.ops)}
  parts = plan.make(s, mesh.devices.size).parts
  out["_expected"] = {
      "train_state_bytes": parts["params"] + parts["optimizer_state"],
      "update_flops": roofline.train_flops(s.model, s.rl.mini_batch_size,
                                           programs.sequence_length(s)) / mesh.devices.size}
  return out


def _out_of_memory() -> str:
  s = _settings(CASES["ragged_dot"], max_new_tokens=2_000_000)
  mesh = sharding.make_mesh(s.mesh, devices=aot.topology_devices("v5e:2x2"))
  try:
    aot.compile_program("decode", programs.build(s, mesh)["decode"], mesh)
  except errors.UserError as e:
    return str(e)
  return "fitted"


def _v5e_exchanges() -> dict:
  """An expert axis on a 64-chip v5e slice (its interconnect has limited routing): the
  padded exchange compiles, the ragged one is refused in one line."""
  out = {}
  for exchange in ("padded", "ragged"):
    config = config_base.get_base_config()
    config.model.update(MODEL, moe_impl="blocks", expert_exchange=exchange)
    config.mesh.update(data=1, fsdp=32, expert=2, tensor=1)
    config.data.max_prompt_len = 64
    config.sampler.update(max_new_tokens=64, prompt_bucket=64)
    config.rl.update(prompts_per_step=32, group_size=2, mini_batch_size=64)
    s = settings_lib.from_config(config)
    mesh = sharding.make_mesh(s.mesh, devices=aot.topology_devices("v5e:8x8"))
    try:
      out[exchange] = list(aot.compile_program("pi_old", programs.build(s, mesh)["pi_old"],
                                               mesh).ops)
    except errors.UserError as e:
      out[exchange] = str(e)
  return out


def main():
  out = {name: _case(case) for name, case in CASES.items()}
  out["oom"] = _out_of_memory()
  out["v5e_exchanges"] = _v5e_exchanges()
  out["chip"] = dataclasses.asdict(aot.chip_of(aot.topology_devices(TOPOLOGY)[0]))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
