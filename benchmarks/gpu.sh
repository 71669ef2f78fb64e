#!/usr/bin/env bash
# Every GPU figure of benchmarks/README.md in one go, on one CUDA GPU (written for an H100/H200;
# about 10 minutes). Needs torch and transformers only; the package is used from this checkout.
#   benchmarks/gpu.sh [OUTPUT_DIR]        # tables go to stdout and to OUTPUT_DIR/*.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-outputs/gpu-benchmarks}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-$(command -v python || command -v python3)}

run() { # NAME ARGS...: one benchmark, its table kept in OUTPUT_DIR/NAME.txt
    local name=$1
    shift
    echo "== $name: $*"
    "$python" "$@" 2>&1 | tee "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    | tee -a "$out/device.txt"
# 1. projector fwd+bwd at CLIP-L/336 widths, H = 4096, batch 32 (144 and 64 tokens), eager and
#    compiled; the vision tower forward, eager and compiled
run projector_s2 benchmarks/projector.py --device cuda --dtype bfloat16 --batch 32 --repeats 20 --compile
run projector_s3 benchmarks/projector.py --device cuda --dtype bfloat16 --batch 32 --repeats 20 --scale 3 --compile
run vision benchmarks/vision.py --device cuda --dtype bfloat16 --batch 64 --repeats 20
# 2. packed vs padded training steps at a bigger (not 7B) LLM
run packing benchmarks/packing.py --device cuda --hidden 2048 --layers 8 --batch 16 --steps 20
# 3. a 7B-shaped stage 2 and stage 1 step, 576 / 144 / 64 visual tokens (chunked loss, as the scripts)
run step benchmarks/step.py --device cuda --peak_tflops 989
#    ... and stage 2 at 144 tokens with the LLM's own loss over full logits
run step_full_logits benchmarks/step.py --device cuda --peak_tflops 989 --stages 2 --projectors tokenpacker:2 \
    --loss_chunk_size 0
# 4. the LM head + loss alone, on a packed row of 64 samples (7B head: 4096 x 32000)
run loss benchmarks/loss.py --device cuda --dtype bfloat16 --batch 64 --repeats 10
