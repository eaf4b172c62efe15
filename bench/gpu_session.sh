#!/usr/bin/env bash
# The GPU checks that issues 14 (QLoRA), 15 (the memory plan, packing) and 16 (serving) leave open, as one command
# for a GPU machine: at most 575 s after the wheels' install (the five parts' bounds, 25 + 180 + 90 + 70 + 160 =
# 525 s, and 10 s each for `timeout -k 10` to kill one). Under a 600 s limit per command, run it as two calls,
# e.g. `bash bench/gpu_session.sh serve` (at most 195 s with the machine part), then `qlora plan packing`.
# Every output is also written to $OUT (default out/gpu).
#
#   bash bench/gpu_wheels.sh          # where PyPI is reachable: .whl/ (bitsandbytes, litgpt, jsonargparse)
#   bash bench/gpu_session.sh [PART ...]   # on the GPU machine; PARTs: qlora plan packing serve (default: all)
#
# The copy of the repository needs .whl/, data/games/ and, for serve, SmolLM2-135M-Instruct's model_config.yaml,
# tokenizer.json and tokenizer_config.json under checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/ (its weights
# are not needed: bench/random_checkpoint.py draws weights of the same shapes there).
#
# 1. QLoRA on Llama-2-7B shapes (bf16, micro batch 4 × 2048): litft --quantize nf4 beside litft LoRA, peft +
#    bitsandbytes and litgpt --quantize bnb.nf4; step time, peak memory, and litft/memory.py's plans (bench/gpu.py).
#    gpu.py plans both 7B steps first (49–73 s on 2 CPU cores), so litft QLoRA and peft + bitsandbytes run next and
#    the rest after them: a part its bound cuts short has measured the comparison first.
# 2. The memory plan against torch.cuda.max_memory_allocated: LoRA, QLoRA, full; seq 128 and 512; activation
#    checkpointing off and on (bench/gpu_memory.py).
# 3. Packing against padding on the GPU (bench/packing.py).
# 4. Serving under load, 32 requests over 4 LoRAs, bf16: litft's server against transformers + PEFT's batched
#    generate (bench/serve_load.py, on random weights of SmolLM2-135M's shapes; its exports to transformers and
#    PEFT skip their own verification, and the comparison checks PEFT's answers against litft's); the all-at-once
#    phase and PEFT's batch alternate 3 times and each side's fastest round counts.
set -u
parts=${*:-qlora plan packing serve}
for p in $parts; do
    [[ " qlora plan packing serve " == *" $p "* ]] || { echo "unknown part $p: choose from qlora plan packing serve"; exit 2; }
done
smollm2=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

part() {  # part NAME SECONDS COMMAND...: run it bounded, show and keep its output (if NAME is asked for)
    local name=$1 limit=$2
    shift 2
    [[ $name == machine || " $parts " == *" $name "* ]] || return 0
    echo "== $name ($(date +%T), at most ${limit} s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v "Failed to load CPU gemm_4bit_forward" \
        | tee "$out/$name.txt"
}

part machine 25 sh -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import importlib, importlib.metadata, sys
print(\"python\", sys.version.split()[0], \"(the wheels of .whl/serve are for 3.12)\")
for m in (\"torch\", \"transformers\", \"peft\", \"lightning\", \"bitsandbytes\", \"litgpt\", \"fastapi\", \"openai\"):
    try:
        importlib.import_module(m)
        print(m, importlib.metadata.version(m))
    except Exception as e:
        print(m, \"missing:\", e)"'
part qlora 180 python3 bench/gpu.py --frameworks '[litft-qlora,transformers-qlora,litft,litgpt-qlora]' --fsdp_steps 0
part plan 90 python3 bench/gpu_memory.py
part packing 70 python3 bench/packing.py --device cuda --precision bf16-true --model Llama-2-7b-hf \
    --micro_batch_size 16 --steps 16 --warmup 2
part serve 160 sh -c "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-serve \
    .whl/serve/*.whl; python3 bench/random_checkpoint.py --source $smollm2 --out_dir /tmp/smollm2-random && \
    PYTHONPATH=\$PYTHONPATH:/tmp/site-serve python3 bench/serve_load.py --checkpoint_dir /tmp/smollm2-random \
    --out_dir /tmp/serve --precision bf16-true --rounds 3"
echo "== done $(date +%T)"
