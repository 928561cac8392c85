"""The work of a compiled program, counted from its HLO text with loop trip counts.

XLA's `cost_analysis()` counts each loop body once, so a scanned model's FLOPs come out as
about one layer's. Here every computation of the compiled module is read from its text: FLOPs
of each dot and convolution (fused or not), and the bytes each top-level instruction reads
and writes (a fusion's inner values stay on chip, as in XLA's own count); a loop's body is
multiplied by its trip count, read from its condition (`i < N` with the counter from 0, the
form `lax.scan` and `fori_loop` compile to). A loop whose count the condition does not state
(a `lax.while_loop` on data, like the sampler's decode loop) is counted once and listed.
A custom kernel (a Mosaic `tpu_custom_call`: megablox) counts the FLOPs and bytes of the
cost estimate its author attached (`pl.CostEstimate`, carried in the call's backend config);
a custom call without one counts its operands and result as bytes and no FLOPs.
"""
import dataclasses
import math
import re
from types import MappingProxyType
from typing import Callable, Mapping, Optional

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
                "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
                "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f4e2m1fn": 0.5, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = ")
# Instructions that move no data of their own (views, plumbing, control).
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "while", "call", "conditional",
         "add-dependency", "copy-start", "copy-done", "slice-done"}
# Custom calls that only reinterpret their operands (XLA:TPU joins prefetched slices so).
_FREE_TARGETS = {"ConcatBitcast"}


@dataclasses.dataclass
class Cost:
  """FLOPs and HBM bytes of a program, loops multiplied out; with a chip's peaks, the
  seconds of each op at its own roofline, summed, and those seconds by op."""
  flops: float = 0.0
  bytes: float = 0.0
  seconds: float = 0.0
  by_op: dict = dataclasses.field(default_factory=dict)  # label: seconds
  loops: list = dataclasses.field(default_factory=list)  # (body, trip count or None)

  def add(self, other: "Cost", times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.bytes += times * other.bytes
    self.seconds += times * other.seconds
    for label, seconds in other.by_op.items():
      self.by_op[label] = self.by_op.get(label, 0.0) + times * seconds

  def top(self, n: int) -> list[tuple[str, float]]:
    """The n ops that take the most seconds, with their seconds."""
    return sorted(self.by_op.items(), key=lambda item: -item[1])[:n]


def op_label(i: "_Instruction") -> str:
  """What an op is, for a breakdown: its kind, the first array it makes and the jax op it
  came from (the tail of its `op_name`)."""
  op_name = re.search(r'op_name="([^"]*)"', i.attributes)
  source = "/".join(op_name.group(1).split("/")[-2:]) if op_name else i.name
  first = _ARRAY.search(i.shape)
  array = f"{first.group(1)}[{first.group(2)}]" if first else i.shape
  return f"{_target(i) or i.op} {array} ({source})"


@dataclasses.dataclass
class _Instruction:
  name: str
  op: str
  shape: str      # the result's type text
  operands: str   # the text inside the op's parentheses
  attributes: str


def array_bytes(text: str) -> float:
  """Bytes of every array type written in `text` (a shape, a tuple, an operand list)."""
  return sum(_DTYPE_BYTES[d] * math.prod(int(n) for n in dims.split(",") if n)
             for d, dims in _ARRAY.findall(text))


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced brackets in {text[:200]!r}")


def _parse_instruction(line: str) -> Optional[_Instruction]:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  rest = line[match.end():]
  end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  op_end = rest.index("(")
  close = _closing(rest, op_end)
  return _Instruction(match.group(2), rest[:op_end], shape, rest[op_end + 1:close],
                      rest[close + 1:])


def parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """{computation: its instructions} of a module's text, and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      instruction = _parse_instruction(line)
      if instruction:
        current.append(instruction)
  if entry is None:
    raise ValueError("no ENTRY computation in the module text")
  return computations, entry


def _dims(attributes: str, name: str) -> list[int]:
  match = re.search(name + r"=\{([\d,]*)\}", attributes)
  return [int(n) for n in match.group(1).split(",") if n] if match else []


def _array_dims(text: str) -> list[list[int]]:
  return [[int(n) for n in dims.split(",") if n] for _, dims in _ARRAY.findall(text)]


def operand_types(instruction: _Instruction, shapes: dict[str, str]) -> list[str]:
  """The type text of each operand: named operands looked up in their computation (the
  TPU compiler's text omits operand types), inline types where the text has them."""
  names = re.findall(r"%([\w.\-]+)", instruction.operands)
  if names and all(n in shapes for n in names):
    return [shapes[n] for n in names]
  return [f"{d}[{dims}]" for d, dims in _ARRAY.findall(instruction.operands)]


def dot_flops(instruction: _Instruction, shapes: dict[str, str]) -> float:
  """2 x output elements x contracted elements, for `dot` and `convolution`."""
  out = _array_dims(instruction.shape)
  operands = [dims for t in operand_types(instruction, shapes) for dims in _array_dims(t)]
  if not out or len(operands) < 2:
    return 0.0
  outputs = math.prod(out[0])
  if instruction.op == "dot":
    lhs = operands[0]
    contracting = _dims(instruction.attributes, "lhs_contracting_dims")
    return 2.0 * outputs * math.prod(lhs[d] for d in contracting)
  return _convolution_flops(out[0], operands[0], operands[1], instruction.attributes)


def _convolution_flops(out: list[int], lhs: list[int], rhs: list[int], attributes: str):
  """2 x multiply-adds that touch real input: per output element, the kernel's input
  features times the window taps that land on an input element, not on padding or on the
  zeros of an lhs dilation (XLA writes batched matmuls as such convolutions)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attributes)
  if not labels:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", attributes)
  fields = dict(re.findall(r"(\w+)=(\S+)", window.group(1))) if window else {}
  spatial = [c for c in out_labels if c.isdigit()]
  per_dim = lambda key, default: (fields[key].split("x") if key in fields
                                  else [default] * len(spatial))
  strides, pads = per_dim("stride", "1"), per_dim("pad", "0_0")
  lhs_dilations, rhs_dilations = per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
  taps = 1
  for d, c in enumerate(spatial):
    size_in, size_out = lhs[lhs_labels.index(c)], out[out_labels.index(c)]
    window_size = rhs[rhs_labels.index(c)]
    stride, lo = int(strides[d]), int(pads[d].split("_")[0])
    lhs_dilate, rhs_dilate = int(lhs_dilations[d]), int(rhs_dilations[d])
    taps *= sum(1 for o in range(size_out) for w in range(window_size)
                if _lands(o * stride + w * rhs_dilate - lo, lhs_dilate, size_in))
  non_spatial = out[out_labels.index("b")] * out[out_labels.index("f")]
  return 2.0 * non_spatial * rhs[rhs_labels.index("i")] * taps


def _lands(position: int, dilation: int, size: int) -> bool:
  return position >= 0 and position % dilation == 0 and position // dilation < size


def trip_count(while_attributes: str, condition: list[_Instruction],
               computations: dict[str, list[_Instruction]]) -> Optional[int]:
  """N of a loop that runs `counter < N` with the counter from 0: XLA's
  `known_trip_count` where the backend writes it (CPU), else the constant bound of the
  condition's `compare(..., direction=LT)`, bare or wrapped in a fusion (TPU); None when the
  condition states no bound (a loop on data)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_attributes)
  if known:
    return int(known.group(1))
  constants = {i.name: i for i in condition if i.op == "constant"}
  for instruction in condition:
    compares = instruction.op == "compare"
    if instruction.op == "fusion":
      called = computations.get((_callees(instruction.attributes, "calls") or [""])[0], [])
      compares = bool(called) and called[-1].op == "compare"
      instruction_attributes = called[-1].attributes if compares else ""
    else:
      instruction_attributes = instruction.attributes
    if compares and "direction=LT" in instruction_attributes:
      names = re.findall(r"%([\w.\-]+)", instruction.operands)
      bound = [constants[n] for n in names[1:] if n in constants]
      if bound:
        value = re.match(r"\s*(-?\d+)", bound[0].operands)
        return int(value.group(1)) if value else None
  return None


def _callees(attributes: str, key: str) -> list[str]:
  match = re.search(key + r"=\{([^}]*)\}", attributes)
  if match:
    return re.findall(r"%([\w.\-]+)", match.group(1))
  match = re.search(key + r"=%([\w.\-]+)", attributes)
  return [match.group(1)] if match else []


_KERNEL_COST = re.compile(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"\d+",'
                          r'"bytes_accessed":"(\d+)"')


def _target(i: _Instruction) -> Optional[str]:
  match = re.search(r'custom_call_target="([^"]+)"', i.attributes)
  return match.group(1) if match else None


def kernel_cost(i: _Instruction) -> Optional[tuple[float, float]]:
  """(FLOPs, bytes) a custom kernel's author estimated for one call, where it says."""
  match = _KERNEL_COST.search(i.attributes) if i.op == "custom-call" else None
  return (float(match.group(1)), float(match.group(2))) if match else None


def moved_bytes(i: _Instruction, shapes: dict[str, str], computations: dict,
                seen_channels: Optional[set] = None) -> float:
  """HBM bytes an instruction reads and writes. A slice read moves the slice, not the
  buffer it reads from; an update in place (a dynamic-update-slice) moves its update, not
  the buffer it writes into; alone or inside a fusion. A kernel moves what its cost
  estimate says. A fusion's outputs aliased to its operands move nothing where they pass
  an operand through, and do not read the operand they overwrite; a collective XLA:TPU
  splits over several fusions (one channel, `seen_channels` of the enclosing computation)
  writes its result once."""
  estimate = kernel_cost(i)
  if estimate is not None:
    return estimate[1]
  operands = operand_types(i, shapes)
  if i.op == "dynamic-slice":
    return 2 * array_bytes(i.shape)
  if i.op == "dynamic-update-slice" and len(operands) > 1:
    return 2 * array_bytes(operands[1])
  if i.op == "slice-start":  # ((source), slice, context): reads the slice
    arrays = _ARRAY.findall(i.shape)
    return array_bytes("{}[{}]".format(*arrays[1])) if len(arrays) > 1 else 0.0
  fused = _callees(i.attributes, "calls") if i.op == "fusion" else []
  body = computations.get(fused[0], []) if fused else []
  if not body:
    return array_bytes(i.shape) + sum(array_bytes(t) for t in operands)
  return _fusion_bytes(i, operands, body, seen_channels)


def _fusion_bytes(i: _Instruction, operands: list[str], body: list[_Instruction],
                  seen_channels: Optional[set]) -> float:
  """`moved_bytes` of a fusion: what its operands and outputs move, given what its body
  does with each (slices, in-place updates, pass-throughs, split collectives)."""
  read = [array_bytes(t) for t in operands]
  by_name = {b.name: b for b in body}
  root = body[-1]
  outputs = ([by_name.get(n) for n in re.findall(r"%([\w.\-]+)", root.operands)]
             if root.op == "tuple" else [root])
  written = [array_bytes(o.shape) if o is not None else 0.0 for o in outputs]
  for parameter in (b for b in body if b.op == "parameter"):
    index = int(re.match(r"\s*(\d+)", parameter.operands).group(1))
    users = [b for b in body if f"%{parameter.name}" in re.findall(r"%[\w.\-]+", b.operands)]
    if index < len(read) and users and all(
        u.op == "dynamic-slice" and _first_operand(u) == parameter.name for u in users):
      read[index] = sum(array_bytes(u.shape) for u in users)
    if (root.op == "dynamic-update-slice" and _first_operand(root) == parameter.name
        and index < len(read)):
      update = by_name.get(re.findall(r"%([\w.\-]+)", root.operands)[1])
      read[index] = 0.0
      written[0] = array_bytes(update.shape) if update is not None else written[0]
  for output, operand in _aliasing(i.attributes):
    if output < len(outputs) and operand < len(read):
      read[operand] = 0.0  # overwritten in place, or passed through
      if outputs[output] is not None and outputs[output].op == "parameter":
        written[output] = 0.0
  if seen_channels is not None:
    for k, o in enumerate(outputs):
      channel = re.search(r"channel_id=(\d+)", o.attributes) if o is not None else None
      if channel and channel.group(1) in seen_channels:
        written[k] = 0.0
      elif channel:
        seen_channels.add(channel.group(1))
  return sum(written) + sum(read)


def _aliasing(attributes: str) -> list[tuple[int, int]]:
  """(output index, operand index) of a fusion's `output_to_operand_aliasing`."""
  match = re.search(r"output_to_operand_aliasing=\{(.*?)\}(?:, [a-z_]+=|$)", attributes)
  pairs = re.findall(r"\{(\d*)\}: \((\d+),", match.group(1)) if match else []
  return [(int(out or 0), int(operand)) for out, operand in pairs]


def _first_operand(i: _Instruction) -> str:
  names = re.findall(r"%([\w.\-]+)", i.operands)
  return names[0] if names else ""


def _scoped_trips(while_attributes: str, trips_by_scope: Mapping[str, int]) -> Optional[int]:
  """The trip count given for a loop traced directly in one of these name scopes."""
  op_name = re.search(r'op_name="([^"]*)"', while_attributes)
  for scope, trips in trips_by_scope.items():
    if op_name and f"/{op_name.group(1)}".endswith(f"/{scope}/while"):
      return trips
  return None


def count(hlo_text: str, trips_by_scope: Mapping[str, int] = MappingProxyType({}),
          peaks: Optional[tuple[float, float]] = None,
          kernel_flops: Optional[Callable[[str, list], Optional[float]]] = None) -> Cost:
  """The program's FLOPs and bytes with every loop's body times its trip count.

  `trips_by_scope` sets the count of loops traced in a `jax.named_scope` (by its name), for
  loops whose compiled bound is a worst case the caller estimates better. With `peaks`
  (FLOP/s, HBM bytes/s), each op also takes max(its FLOPs / FLOP/s, its bytes / bytes/s):
  the time it needs alone at the chip's roofline, no op overlapping another.
  `kernel_flops(op_name, operand dims)` prices custom kernels the caller knows (None: not
  one of them); they move their operands and results.
  """
  computations, entry = parse(hlo_text)
  shapes = {name: {i.name: i.shape for i in body} for name, body in computations.items()}
  flops_memo: dict[str, float] = {}

  def flops_of(i: _Instruction, where: str) -> float:
    if i.op in ("dot", "convolution"):
      return dot_flops(i, shapes[where])
    if i.op == "custom-call":
      return (kernel_cost(i) or (0.0, 0.0))[0]
    return sum(fused_flops(c) for c in _callees(i.attributes, "calls"))

  def known_kernel(i: _Instruction, where: str) -> Optional[float]:
    if kernel_flops is None:
      return None
    op_name = re.search(r'op_name="([^"]*)"', i.attributes)
    operands = [d for t in operand_types(i, shapes[where]) for d in _array_dims(t)]
    return kernel_flops(op_name.group(1), operands) if op_name else None

  def fused_flops(name: str) -> float:  # dots inside a fusion, and fusions inside it
    if name not in flops_memo:
      flops_memo[name] = sum(flops_of(i, name) for i in computations.get(name, []))
    return flops_memo[name]

  loops = []

  def run(name: str) -> Cost:
    cost, channels = Cost(), set()
    for i in computations.get(name, []):
      if i.op == "while":
        (body,) = _callees(i.attributes, "body")
        (condition,) = _callees(i.attributes, "condition")
        trips = _scoped_trips(i.attributes, trips_by_scope)
        if trips is None:
          trips = trip_count(i.attributes, computations.get(condition, []), computations)
        loops.append((body, trips))
        cost.add(run(body), trips if trips is not None else 1)
      elif i.op == "call":
        for callee in _callees(i.attributes, "to_apply"):
          cost.add(run(callee))
      elif i.op == "conditional":
        branches = (_callees(i.attributes, "branch_computations")
                    or _callees(i.attributes, "true_computation")
                    + _callees(i.attributes, "false_computation"))
        if branches:
          costs = [run(b) for b in branches]
          cost.add(max(costs, key=lambda c: (c.flops, c.bytes)))
      elif i.op not in _FREE and _target(i) not in _FREE_TARGETS:
        priced = known_kernel(i, name) if i.op == "custom-call" else None
        if priced is not None:  # operands and results, once
          flops = priced
          moved = array_bytes(i.shape) + sum(array_bytes(t)
                                             for t in operand_types(i, shapes[name]))
        else:
          flops = flops_of(i, name)
          moved = moved_bytes(i, shapes[name], computations, channels)
        cost.bytes += moved
        cost.flops += flops
        if peaks is not None:
          seconds = max(flops / peaks[0], moved / peaks[1])
          cost.seconds += seconds
          label = op_label(i)
          cost.by_op[label] = cost.by_op.get(label, 0.0) + seconds
    return cost

  total = run(entry)
  total.loops = loops
  return total
