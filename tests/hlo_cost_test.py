"""hlo_cost: FLOPs and bytes of compiled modules with loop trip counts, against hand counts."""
import jax
import jax.numpy as jnp
import pytest

from minirl_jax import hlo_cost

M, K, N = 16, 32, 24


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_nested_loops_multiply_their_bodies():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))

  def fn(x, w):
    inner = lambda i, y: jnp.tanh(y @ w)
    return jax.lax.fori_loop(0, 5, lambda i, y: jax.lax.fori_loop(0, 3, inner, y), x)

  cost = hlo_cost.count(_compiled_text(fn, x, w))
  assert cost.flops == 15 * 2 * M * K * K
  assert sorted(trips for _, trips in cost.loops) == [3, 5]


def test_a_loop_in_a_named_scope_takes_the_trip_count_given_for_it():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))

  def fn(x, w):
    inner = lambda i, y: jnp.tanh(y @ w)
    with jax.named_scope("rounds"):
      y = jax.lax.fori_loop(0, 7, inner, x)
    return jax.lax.fori_loop(0, 3, inner, y)

  text = _compiled_text(fn, x, w)
  assert hlo_cost.count(text).flops == 10 * 2 * M * K * K
  assert hlo_cost.count(text, {"rounds": 1}).flops == 4 * 2 * M * K * K
  assert hlo_cost.count(text, {"round": 1}).flops == 10 * 2 * M * K * K  # the whole name


def test_a_loop_on_data_is_counted_once_and_listed():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))

  def fn(x, w):
    return jax.lax.while_loop(lambda y: y.sum() < 1e6, lambda y: y @ w, x)

  cost = hlo_cost.count(_compiled_text(fn, x, w))
  assert cost.flops == 2 * M * K * K
  assert [trips for _, trips in cost.loops] == [None]


def test_a_batched_dot_contracts_only_its_contracting_dims():
  a, b = jnp.ones((3, M, K)), jnp.ones((3, K, N))
  cost = hlo_cost.count(_compiled_text(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b), a, b))
  assert cost.flops == 2 * 3 * M * K * N


# XLA:TPU writes operands by name only, loops with a bound in a fused compare, batched
# matmuls as convolutions whose lhs dilation leaves one live tap, and in-place updates as
# fusions rooted in a dynamic-update-slice.
TPU_TEXT = """HloModule tpu_like

%fused_compare (p0: s32[], p1: s32[]) -> pred[] {
  %p0 = s32[] parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %lt = pred[] compare(%p0, %p1), direction=LT
}

%cond (t: (s32[], f32[52,8,64], f32[52,64,32])) -> pred[] {
  %t = (s32[]{:T(128)}, f32[52,8,64]{2,1,0}, f32[52,64,32]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %bound = s32[] constant(6)
  ROOT %c = pred[] fusion(%i, %bound), kind=kLoop, calls=%fused_compare
}

%fused_update (q0: f32[1024,64], q1: f32[8,64], q2: s32[]) -> f32[1024,64] {
  %q0 = f32[1024,64]{1,0} parameter(0)
  %q1 = f32[8,64]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = f32[1024,64]{1,0} dynamic-update-slice(%q0, %q1, %q2, %zero)
}

%body (t: (s32[], f32[52,8,64], f32[52,64,32])) -> (s32[], f32[52,8,64], f32[52,64,32]) {
  %t = (s32[]{:T(128)}, f32[52,8,64]{2,1,0}, f32[52,64,32]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %a = f32[52,8,64]{2,1,0} get-tuple-element(%t), index=1
  %b = f32[52,64,32]{2,1,0} get-tuple-element(%t), index=2
  %conv = f32[52,8,32]{2,1,0} convolution(%a, %b), CONV_WINDOW
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[52,8,64], f32[52,64,32]) tuple(%next, %a, %b)
}

ENTRY %main (a: f32[52,8,64], b: f32[52,64,32], c: f32[1024,64], r: f32[8,64]) -> f32[1024,64] {
  %a = f32[52,8,64]{2,1,0} parameter(0)
  %b = f32[52,64,32]{2,1,0} parameter(1)
  %cache = f32[1024,64]{1,0} parameter(2)
  %row = f32[8,64]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %t = (s32[], f32[52,8,64], f32[52,64,32]) tuple(%zero, %a, %b)
  %loop = (s32[], f32[52,8,64], f32[52,64,32]) while(%t), condition=%cond, body=%body
  ROOT %new = f32[1024,64]{1,0} fusion(%cache, %row, %zero), kind=kLoop, calls=%fused_update
}
""".replace("CONV_WINDOW", "window={size=52 stride=51 lhs_dilate=52}, dim_labels=0bf_0io->0bf")


SLICE_TEXT = """HloModule slice_read

%fused_slice (p0: f32[1024,64], p1: s32[]) -> f32[8,64] {
  %p0 = f32[1024,64]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %rows = f32[8,64]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={8,64}
  ROOT %out = f32[8,64]{1,0} exponential(%rows)
}

ENTRY %main (c: f32[1024,64], i: s32[]) -> f32[8,64] {
  %c = f32[1024,64]{1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %read = f32[8,64]{1,0} fusion(%c, %i), kind=kLoop, calls=%fused_slice
}
"""


def test_a_fused_slice_read_moves_the_slice_not_its_buffer():
  assert hlo_cost.count(SLICE_TEXT).bytes == 4 * 8 * 64 + 4 * 8 * 64 + 4


def test_tpu_text_loops_batched_convolutions_and_updates_in_place():
  cost = hlo_cost.count(TPU_TEXT)
  assert cost.loops == [("body", 6)]
  # The convolution is 52 matmuls [8, 64] x [64, 32]; only 1 of its 52 taps meets input.
  assert cost.flops == 6 * 52 * 2 * 8 * 64 * 32
  conv_bytes = 4 * (52 * 8 * 32 + 52 * 8 * 64 + 52 * 64 * 32)
  add_bytes = 3 * 4
  # The update moves its [8, 64] row and index, not the [1024, 64] cache it writes into.
  update_bytes = 4 * 8 * 64 + 4 * 8 * 64 + 4
  assert cost.bytes == 6 * (conv_bytes + add_bytes) + update_bytes


@pytest.mark.parametrize("text,expected", [
    ("bf16[2,3]{1,0}", 12), ("(s32[], f32[4])", 20), ("s4[8]", 4), ("pred[]", 1)])
def test_array_bytes_of_shapes_and_tuples(text, expected):
  assert hlo_cost.array_bytes(text) == expected


KERNEL_CONFIG = ('{"custom_call_config":{"body":"TUzv","cost_estimate":{"flops":"1000",'
                 '"transcendentals":"0","bytes_accessed":"300","remote_bytes_transferred":"0"}}}')
KERNEL_TEXT = """
HloModule kernel

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %p = (s32[], f32[64,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,128]{1,0} get-tuple-element(%p), index=1
  %gmm = f32[64,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/my_kernel/pallas_call"}, backend_config=CONFIG
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64,128]{1,0}) tuple(%next, %gmm)
}

%cond (p: (s32[], f32[64,128])) -> pred[] {
  %p = (s32[], f32[64,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[64,128]) -> f32[64,128] {
  %x = f32[64,128]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[64,128]{1,0}) tuple(%zero, %x)
  %w = (s32[], f32[64,128]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %y = f32[64,128]{1,0} get-tuple-element(%w), index=1
}
""".replace("CONFIG", KERNEL_CONFIG)


def test_a_kernel_counts_its_cost_estimate_per_call():
  cost = hlo_cost.count(KERNEL_TEXT)
  assert cost.loops == [("body", 4)]
  assert cost.flops == 4 * 1000
  assert cost.bytes == 4 * (300 + 3 * 4)  # the kernel's bytes, and the counter's add


def test_a_kernel_the_caller_prices_moves_its_operands_and_result():
  def price(op_name, operand_dims):
    return 77.0 if "/my_kernel/" in op_name and operand_dims == [[64, 128]] else None
  cost = hlo_cost.count(KERNEL_TEXT, kernel_flops=price)
  assert cost.flops == 4 * 77
  assert cost.bytes == 4 * (2 * 4 * 64 * 128 + 3 * 4)
  assert hlo_cost.count(KERNEL_TEXT, kernel_flops=lambda *_: None).flops == 4 * 1000


ASYNC_TEXT = """
HloModule async_gather

%step (p0: f32[64], p1: bf16[256,1024]) -> (f32[64], bf16[256,1024]) {
  %p0 = f32[64]{0} parameter(0)
  %p1 = bf16[256,1024]{1,0} parameter(1)
  %y = f32[64]{0} exponential(%p0)
  ROOT %t = (f32[64]{0}, bf16[256,1024]{1,0}) tuple(%y, %p1)
}

%gather (p0: f32[64], p1: bf16[64,1024], p2: bf16[256,1024]) -> (f32[64], bf16[256,1024]) {
  %p0 = f32[64]{0} parameter(0)
  %p1 = bf16[64,1024]{1,0} parameter(1)
  %p2 = bf16[256,1024]{1,0} parameter(2)
  %y = f32[64]{0} exponential(%p0)
  %g = bf16[256,1024]{1,0} all-gather(%p1), channel_id=7, dimensions={0}
  ROOT %t = (f32[64]{0}, bf16[256,1024]{1,0}) tuple(%y, %g)
}

ENTRY %main (x: f32[64], w: bf16[64,1024], buffer: bf16[256,1024]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  %w = bf16[64,1024]{1,0} parameter(1)
  %buffer = bf16[256,1024]{1,0} parameter(2)
  %a = (f32[64]{0}, bf16[256,1024]{1,0}) fusion(%x, %w, %buffer), kind=kOutput, output_to_operand_aliasing={{1}: (2, {})}, calls=%gather
  %a0 = f32[64]{0} get-tuple-element(%a), index=0
  %a1 = bf16[256,1024]{1,0} get-tuple-element(%a), index=1
  %b = (f32[64]{0}, bf16[256,1024]{1,0}) fusion(%a0, %w, %a1), kind=kOutput, output_to_operand_aliasing={{1}: (2, {})}, calls=%gather
  %b0 = f32[64]{0} get-tuple-element(%b), index=0
  %b1 = bf16[256,1024]{1,0} get-tuple-element(%b), index=1
  %c = (f32[64]{0}, bf16[256,1024]{1,0}) fusion(%b0, %b1), kind=kLoop, output_to_operand_aliasing={{1}: (1, {})}, calls=%step
  %s = ((f32[64]{0}), f32[8]{0:S(1)}, s32[]) slice-start(%x), slice={[0:8]}
  %d = f32[8]{0:S(1)} slice-done(%s)
  ROOT %c0 = f32[64]{0} get-tuple-element(%c), index=0
}
"""


def test_fusions_in_place_pass_through_and_one_collective_split_over_fusions():
  vector, shard, gathered = 4 * 64, 2 * 64 * 1024, 2 * 256 * 1024
  # One all-gather (channel 7) split over two fusions writes its result once; the buffer
  # it overwrites in place is not read; the last fusion passes the buffer through.
  gather_fusions = 2 * (2 * vector + shard) + gathered
  step_fusion = 2 * vector
  slice_read = 4 * 8  # slice-start reads its slice; slice-done moves nothing
  assert hlo_cost.count(ASYNC_TEXT).bytes == gather_fusions + step_fusion + slice_read
