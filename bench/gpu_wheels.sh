#!/usr/bin/env bash
# The packages bench/gpu_session.sh needs that a lent GPU machine lacks, as wheels in .whl/ (git-ignored), for the
# device tool to carry there (its README: 64 MiB in all; these are about 45 MB). Run here, where PyPI is reachable:
#   bash bench/gpu_wheels.sh
# Pinned to the versions bench/RESULTS.md reports; --no-deps because torch, transformers, peft, lightning and the
# rest are already there (/work/.library/device/KINDS.md lists them).
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    bitsandbytes==0.50.2 litgpt==0.5.13 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
du -sh .whl
