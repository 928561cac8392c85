#!/usr/bin/env bash
# Wheels a lent GPU machine lacks (docs/device.md): its image has JAX, flax, optax, orbax,
# chex, absl, scipy, matplotlib and tqdm, but not grain, ml-collections or tensorboardX.
# Downloads them and their missing needs for its Python 3.12 on x86-64 into .whl/
# (git-ignored), which a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qsx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
platforms=()
for n in 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --platform any \
  -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 \
  tensorboardX==2.6.5
ls .whl
