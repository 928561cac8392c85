"""On 8 fake CPU devices (run by plan_test.py): `plan.make`'s per-program bytes next to XLA's
`memory_analysis()` of the same programs compiled from abstract shapes. Prints one JSON line."""
import json
import math

import jax

from minirl_jax import config_base
from minirl_jax import plan as plan_lib
from minirl_jax.rl import programs
from minirl_jax import sharding
from minirl_jax.rl import settings as settings_lib

# Scaled-down shapes of the 30B presets: remat, chunked attention and logits, bfloat16 off
# (XLA:CPU computes bfloat16 dots in float32 buffers, which no accelerator does).
MODEL = dict(vocab_size=2048, d_model=256, num_layers=4, num_heads=8, num_kv_heads=2,
             head_dim=32, num_experts=8, top_k=2, expert_ffn_dim=256, attention_chunk=128,
             logits_chunk=128)
CASES = {
    "fsdp4_expert2_remat": dict(mesh=dict(data=1, fsdp=4, expert=2), model=dict(remat=True),
                                rl=dict(micro_batch_size=16)),
    "fsdp8_no_remat": dict(mesh=dict(data=1, fsdp=8, expert=1), model=dict(remat=False),
                           rl=dict(micro_batch_size=8)),
    # Held out: added after the terms were fitted to the cases above and a third (data=2,
    # fsdp=2, expert=2, 6 layers; dropped to keep the suite short).
    "fsdp2_expert4_held_out": dict(mesh=dict(data=1, fsdp=2, expert=4),
                                   model=dict(remat=True, num_layers=2, num_experts=16,
                                              top_k=4, expert_ffn_dim=128),
                                   rl=dict(micro_batch_size=0)),
}


def _config(case):
  config = config_base.get_base_config()
  config.model.update({**MODEL, **case["model"]})
  config.mesh.update(case["mesh"])
  config.data.max_prompt_len = 64
  config.sampler.update(max_new_tokens=448, prompt_bucket=64,
                        dtype=case.get("sampler", "int8"))
  config.rl.update(prompts_per_step=16, group_size=4, mini_batch_size=32, **case["rl"])
  return config


def _total(compiled):
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def _shard_bytes(tree):
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _measure(s, mesh):
  """The run's own programs (`rl.programs`), compiled for the fake devices."""
  built = programs.build(s, mesh)
  state = built["rl_step"].args[0]
  weights, carry, _ = built["decode"].args
  exact = {"params": _shard_bytes(state.params),
           # Adam's moments: every array but the step counts
           "optimizer_state": _shard_bytes([x for x in jax.tree.leaves(state.opt_state)
                                            if x.ndim]),
           "sampler_weights": _shard_bytes(weights),
           "kv_cache": _shard_bytes(carry.cache)}
  return exact, {"train_step": _total(programs.compiled(built["rl_step"], mesh)),
                 "pi_old": _total(programs.compiled(built["pi_old"], mesh)),
                 "decode": _total(programs.compiled(built["decode"], mesh))}


def main():
  out = {}
  for name, case in CASES.items():
    s = settings_lib.from_config(_config(case))
    mesh = sharding.make_mesh(s.mesh)
    plan = plan_lib.make(s, jax.device_count())
    exact, xla = _measure(s, mesh)
    out[name] = {"plan": plan.programs, "xla": xla, "exact": exact,
                 "plan_parts": {k: plan.parts[k] for k in exact}}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
