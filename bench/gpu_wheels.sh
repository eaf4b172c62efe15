#!/usr/bin/env bash
# The packages bench/gpu_session.sh needs beyond a CUDA machine's usual stack (torch, transformers, peft, lightning),
# as wheels in .whl/ (git-ignored, about 45 MB), for a GPU machine that cannot reach PyPI: fetch them where PyPI is
# reachable, then copy .whl/ with the repository.
#   bash bench/gpu_wheels.sh
# Pinned to the versions bench/RESULTS.md reports; --no-deps: the rest is expected to be there already. The
# server's packages (fastapi, uvicorn, the openai client) go with their dependencies to .whl/serve/ (6 MB), which
# only the serve part of bench/gpu_session.sh puts on its path.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    bitsandbytes==0.50.2 litgpt==0.5.13 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/serve \
    fastapi==0.165.0 uvicorn==0.54.0 openai==3.57.0
du -sh .whl
