#!/usr/bin/env bash
# The GPU checks that issues 14 (QLoRA) and 15 (the memory plan, packing) leave open, as one command for a GPU
# machine: at most 9 minutes, each part bounded by `timeout`, every output also written to $OUT (default out/gpu).
#
#   bash bench/gpu_wheels.sh          # where PyPI is reachable: .whl/ (bitsandbytes, litgpt, jsonargparse)
#   bash bench/gpu_session.sh         # on the GPU machine, in a copy of the repository with .whl/ and data/games/
#
# 1. QLoRA on Llama-2-7B shapes (bf16, micro batch 4 × 2048): litft --quantize nf4 beside litft LoRA, peft +
#    bitsandbytes and litgpt --quantize bnb.nf4; step time, peak memory, and litft/memory.py's plans (bench/gpu.py).
# 2. The memory plan against torch.cuda.max_memory_allocated: LoRA, QLoRA, full; seq 128 and 512; activation
#    checkpointing off and on (bench/gpu_memory.py).
# 3. Packing against padding on the GPU (bench/packing.py).
set -u
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

part() {  # part NAME SECONDS COMMAND...: run it bounded, show and keep its output
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), at most ${limit} s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v "Failed to load CPU gemm_4bit_forward" \
        | tee "$out/$name.txt"
}

part machine 60 sh -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import importlib, importlib.metadata
for m in (\"torch\", \"transformers\", \"peft\", \"lightning\", \"bitsandbytes\", \"litgpt\"):
    try:
        importlib.import_module(m)
        print(m, importlib.metadata.version(m))
    except Exception as e:
        print(m, \"missing:\", e)"'
part qlora 240 python3 bench/gpu.py --frameworks '[litft,litft-qlora,litgpt-qlora,transformers-qlora]' --fsdp_steps 0
part plan 120 python3 bench/gpu_memory.py
part packing 90 python3 bench/packing.py --device cuda --precision bf16-true --model Llama-2-7b-hf \
    --micro_batch_size 16 --steps 16 --warmup 2
echo "== done $(date +%T)"
