#!/usr/bin/env bash
# Download the wheels bench/gpu_all.py needs on the GPU machine, which has no bitsandbytes and no network:
# bitsandbytes 0.50.2 for CPython 3.12 on manylinux x86_64 (the machine's python3), into .whl/ (git-ignored).
# gpu_all.py installs them there with `pip install --no-index --no-deps --target /tmp/site` when bitsandbytes
# does not import. Its dependencies (torch, numpy, packaging) are already on that machine.
#
#   bash bench/fetch_wheels.sh                   # here, where pip reaches the index (PYTHON=... to choose pip)
#   then the device call, with the wheels carried:
#   run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_all.py $OUT/gpu", carry=[".whl"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl bitsandbytes==0.50.2
ls -l .whl
