#!/usr/bin/env bash
# Wheels for benchmark/device_check.py on a GPU machine without network access whose Python 3.12 has torch, jax with
# CUDA, numpy, scipy, matplotlib, tensorboard, pytest, flax, chex, ... but none of this project's other packages:
# the packages the six scripts and tests/test_device.py import that such a machine lacks, for CPython 3.12 on
# manylinux x86-64, at the versions installed here (those the tests pass with; the newest where one is not installed),
# one version each, into DIR (default .whl/, git-ignored). device_check.py installs them from there with
# `pip install --no-index --no-deps --target`.
#
#   bash benchmark/fetch_wheels.sh [DIR]        PYTHON=python3 to read the versions from another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python}
# tyro (CLI) and its parser; SMAX (jaxmarl); MaMuJoCo (gymnasium-robotics, mujoco and its core, glfw, cffi); MPE (mpe2, pygame)
PACKAGES=(tyro docstring-parser typeguard jaxmarl gymnasium farama-notifications gymnasium-robotics pettingzoo
          mujoco mujoco-core glfw cffi pycparser mpe2 pygame-ce)
PLATFORMS=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

specs=()
for package in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$package" 2>/dev/null || true)
    specs+=("$package${version:+==$version}")
done
mkdir -p "$DIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "${specs[@]}"
count=$(ls "$DIR"/*.whl | wc -l)
echo "$count wheels in $DIR ($(du -sh "$DIR" | cut -f1)): ${specs[*]}"
