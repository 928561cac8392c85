"""Every program of a run compiled by XLA:TPU on a host without a TPU (ahead of time).

With libtpu installed, `jax.experimental.topologies` describes a TPU slice this host does not
have; a mesh of its devices and `jit(...).lower(abstract args).compile()` run the real TPU
compiler, Mosaic kernels included. Per program and device this reports:
- memory: XLA:TPU's own buffer assignment (`memory_analysis()`): exact for that compiler;
- work: FLOPs and HBM bytes counted from the compiled HLO with every loop's trip count
  (`hlo_cost`; Mosaic kernels by their cost estimates, flash attention's by the blocks it
  computes; the expert exchange at one round, a balanced router), beside the compiler's
  own `cost_analysis()`, which counts a loop body once;
- time, both estimates: the compiler's `optimal_seconds` (per loop body; negative where its
  cost model does not price a custom kernel) and a roofline: each op at max(its FLOPs / peak
  FLOP/s, its bytes / HBM bandwidth) at the chip's published peaks, summed with trip counts,
  a lower bound that leaves out the interconnect's time and any overlap; the ops that take
  most of it are kept (`slowest`).
"""
import dataclasses
import importlib.util
import os
import re

from jax.experimental import topologies

from minirl_jax import errors
from minirl_jax import hlo_cost
from minirl_jax import roofline
from minirl_jax.models import expert_parallel
from minirl_jax.models import flash
from minirl_jax.rl import programs

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's published peaks (`roofline.PUBLISHED`): bf16 dense FLOP/s, HBM bytes/s."""
  name: str  # the device kind, e.g. "TPU v5 lite"
  flops: float
  hbm_bandwidth: float


def chip_of(device) -> Chip:
  """The published peaks of a (possibly described, not present) device."""
  peaks = roofline.published_peaks(device.device_kind)
  if peaks is None:
    raise errors.UserError(f"no published peaks for {device.device_kind!r} "
                           "(minirl_jax/roofline.py PUBLISHED): the roofline needs them")
  return Chip(device.device_kind, *peaks)


def topology_devices(topology: str) -> list:
  """The devices of a TPU slice, described by libtpu without the hardware."""
  if importlib.util.find_spec("libtpu") is None:
    raise errors.UserError("compiling for TPU needs libtpu, which is not installed: "
                           "pip install -e '.[tpu]'")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
  # Compiling opens no chip, so a compile may run beside another process using libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                             **_host_bounds(topology)).devices)
  except Exception as e:  # libtpu names what it does not know in its message
    raise errors.UserError(f"topology {topology!r}: {str(e).splitlines()[0]}") from e


def _host_bounds(topology: str) -> dict:
  """libtpu describes a slice as hosts of 2x2x1 chips; a slice smaller than one host (a
  single chip, "v6e:1x1") is one host of its own size."""
  dims = [int(n) for n in re.findall(r"\d+", topology.partition(":")[2])]
  if dims and any(d < h for d, h in zip(dims, (2, 2, 1))):
    return {"chips_per_host_bounds": (dims + [1, 1])[:3]}
  return {}


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One program as XLA:TPU compiled it, per device."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  flops: float            # counted with loop trip counts (hlo_cost)
  bytes: float            # HBM bytes, counted the same way
  roofline_seconds: float  # each op at the chip's roofline, summed: a lower bound
  compiler_flops: float   # cost_analysis(): each loop body once
  compiler_bytes: float
  optimal_seconds: float  # the compiler's estimate, each loop body once
  uncounted_loops: int    # loops whose trip count the HLO does not state, counted once
  ops: tuple[str, ...]    # custom-call targets (Mosaic kernels) and collectives it runs
  slowest: tuple[tuple[str, float], ...]  # the ops taking the most roofline seconds

  @property
  def peak(self) -> int:
    """Bytes live on the device while the program runs (donated inputs counted once)."""
    return self.arguments + self.outputs + self.temporaries - self.aliased


# Loops whose compiled bound is a worst case: the expert exchange scans over the rounds the
# most skewed router could need, each a `lax.cond` that is a no-op past the rounds a step
# needs; a balanced router needs one, which is what the estimates count.
BALANCED_TRIPS = {expert_parallel.ROUNDS_SCOPE: 1}
SLOWEST = 8  # ops kept per program for the breakdown
# XLA:TPU's words for a slice whose interconnect the ragged all-to-all does not support.
_NO_RAGGED = "Ragged all-to-all is currently not supported in limited ICI routing"


def compile_program(name: str, program, mesh) -> Compiled:
  """Compiles one `rl.programs` program on a TPU mesh; an out-of-memory compile is one
  `errors.UserError` naming the program, the bytes it needs and the bytes the chip has."""
  chip_kind = mesh.devices.flat[0].device_kind
  try:
    executable = programs.compiled(program, mesh)
  except Exception as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      raise errors.UserError(out_of_memory_message(name, str(e), chip_kind)) from None
    if _NO_RAGGED in str(e):
      raise errors.UserError(
          f"the {name} program cannot run on this {chip_kind} slice: XLA:TPU does not "
          "support the ragged all-to-all on its interconnect (limited ICI routing); set "
          "model.expert_exchange=padded") from None
    raise
  memory = executable.memory_analysis()
  cost = executable.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  text = executable.as_text()
  chip = chip_of(mesh.devices.flat[0])
  counted = hlo_cost.count(text, BALANCED_TRIPS, (chip.flops, chip.hbm_bandwidth),
                           flash.kernel_flops)
  return Compiled(
      arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
      temporaries=memory.temp_size_in_bytes, aliased=memory.alias_size_in_bytes,
      flops=counted.flops, bytes=counted.bytes, roofline_seconds=counted.seconds,
      compiler_flops=float(cost.get("flops", 0.0)),
      compiler_bytes=float(cost.get("bytes accessed", 0.0)),
      optimal_seconds=float(cost.get("optimal_seconds", float("nan"))),
      uncounted_loops=sum(trips is None for _, trips in counted.loops), ops=ops_in(text),
      slowest=tuple(counted.top(SLOWEST)))


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "ragged-all-to-all", "collective-permute")


def ops_in(hlo_text: str) -> tuple[str, ...]:
  """The custom-call targets, Pallas kernels (`pallas:` and the function that called
  `pallas_call`) and collectives a compiled module runs."""
  targets = set(re.findall(r'custom_call_target="([^"]+)"', hlo_text))
  kernels = {"pallas:" + re.sub(r"^jit\((.*)\)$", r"\1", name) for name in re.findall(
      r'op_name="[^"]*/([^/"]+)/pallas_call"', hlo_text)}
  collectives = {op for op in _COLLECTIVES if re.search(rf"[ =]{op}(-start)?\(", hlo_text)}
  return tuple(sorted(targets | kernels | collectives))


_SIZE = r"([\d.]+)([KMGT]?)"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# XLA:TPU's wordings of an out-of-memory compile (what it needs, then what the chip has).
_OOM = (re.compile(r"\(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)"),
        re.compile(r"Used " + _SIZE + r" of " + _SIZE))


def out_of_memory_message(name: str, error: str, chip: str) -> str:
  """The compiler's RESOURCE_EXHAUSTED as one line: what the program needs, what fits."""
  for pattern in _OOM:
    match = pattern.search(error)
    if match:
      need = float(match.group(1)) * _UNITS[match.group(2)]
      have = float(match.group(3)) * _UNITS[match.group(4)]
      break
  else:
    first = error.strip().splitlines()[0] if error.strip() else "RESOURCE_EXHAUSTED"
    return f"the {name} program does not fit a {chip} chip: XLA:TPU says {first}"
  return (f"the {name} program does not fit a {chip} chip: XLA:TPU needs "
          f"{need / GIB:,.2f} GiB of the {have / GIB:.2f} GiB of HBM it has "
          "(RESOURCE_EXHAUSTED); scripts/plan.py shows where the memory goes")


def compile_all(built: dict, mesh, names=None) -> dict[str, Compiled]:
  """The programs `rl.programs.build` made on `mesh` (those in `names`, default all),
  compiled."""
  unknown = set(names or ()) - set(built)
  if unknown:
    raise errors.UserError(f"--programs: no program {sorted(unknown)[0]!r} in this run; "
                           f"its programs: {', '.join(built)}")
  return {name: compile_program(name, program, mesh if program.mesh is None else program.mesh)
          for name, program in built.items() if names is None or name in names}
