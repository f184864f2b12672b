#!/usr/bin/env bash
# Download, here, the wheels a GPU machine without network needs for benchmarks/gpu.sh:
# ASE and vesin for atomlens; SchNetPack 2.1.1 and what its import needs, for the peer side.
# Python 3.12, manylinux x86-64 (the lent machine's interpreter). Writes .whl/ (ignore it in
# git: echo /.whl/ >> .git/info/exclude) and carry it with the run.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp "${platforms[@]}" -d .whl \
  ase==3.29.0 vesin==0.6.2 schnetpack==2.1.1 omegaconf==2.3.1 matscipy==1.3.1 \
  dirsync==2.2.6 fasteners==0.20 torch-ema==0.3
# antlr4-python3-runtime (omegaconf's parser) is published as a source archive only
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
