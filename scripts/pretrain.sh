#!/usr/bin/env bash
# Stage 1: pretrain the TokenPacker projector on LLaVA-558K captions (vision tower and LLM frozen).
# Reference: 8 GPUs x 32 = global batch 256, lr 1e-3, template plain, ZeRO-2, 1 epoch, cosine.
# Every setting is an environment variable (scripts/launch.sh has the shared ones and the
# cluster ones: LAUNCHER, NNODES, GPUS_PER_NODE, DRY_RUN, ...); arguments go on to
# `python -m tokenpacker_llava.train` and win over the recipe. See docs/cluster.md.
#   MODEL_SIZE=13b scripts/pretrain.sh
#   DRY_RUN=1 GPUS_PER_NODE=2 scripts/pretrain.sh --max_steps 10
set -euo pipefail
# shellcheck source=scripts/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

tp_model_defaults
DATA_PATH=${DATA_PATH:-$DATA_ROOT/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$DATA_ROOT/LLaVA-Pretrain/images}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/$TP_TAG-pretrain}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}
LR=${LR:-1e-3}
SAVE_STEPS=${SAVE_STEPS:-500}
tp_training_defaults

tp_log "stage 1: pretrain the projector (writes $OUTPUT_DIR/projector.safetensors)"
tp_show MODEL_SIZE LLM VISION_TOWER PROJECTOR_TYPE SCALE_FACTOR IMAGE_ASPECT_RATIO PATCH_NUM DATA_PATH IMAGE_FOLDER OUTPUT_DIR \
    RUN_NAME DEEPSPEED_CONFIG GLOBAL_BATCH PER_DEVICE_BATCH GRAD_ACCUM LR EPOCHS MAX_LENGTH PACKING LOSS_CHUNK_SIZE \
    NUM_WORKERS REPORT_TO SAVE_STEPS SAVE_TOTAL_LIMIT RESUME \
    EVAL_DATA_PATH EVAL_STEPS

tp_common_args
TP_ARGS+=(
    --version plain
    --tune_mm_mlp_adapter True
)
tp_launch "$@"
