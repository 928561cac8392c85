"""The train-infer gap's levels by name, apart from `gap` so that naming them (the grids, the
reports) does not import JAX."""

ZERO = "zero"  # the zero-gap control: mu := pi_old
LEVELS = ("float32", "float16", "bfloat16", "int8", "fp8", "int4")  # narrowest gap first
