#!/usr/bin/env bash
# Stage 2: instruction-tune projector + LLM on LLaVA-mix665k, starting from stage 1's projector.
# Reference: 8 GPUs x 16 = global batch 128, lr 2e-5, template v1, ZeRO-2, 1 epoch, cosine,
# grouped by modality length. Every setting is an environment variable (scripts/launch.sh has
# the shared and cluster ones: LAUNCHER, NNODES, GPUS_PER_NODE, DRY_RUN, ...); arguments go on
# to `python -m tokenpacker_llava.train` and win over the recipe. See docs/cluster.md.
#   MODEL_SIZE=13b scripts/finetune.sh
#   PRETRAINED_PROJECTOR=/ckpt/stage1/projector.safetensors scripts/finetune.sh
#   IMAGE_ASPECT_RATIO=slice PATCH_NUM=9 scripts/finetune.sh  # TokenPacker-HD (both stages alike)
set -euo pipefail
# shellcheck source=scripts/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

tp_model_defaults
DATA_PATH=${DATA_PATH:-$DATA_ROOT/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$DATA_ROOT} # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
PRETRAIN_DIR=${PRETRAIN_DIR:-./checkpoints/$TP_TAG-pretrain}
PRETRAINED_PROJECTOR=${PRETRAINED_PROJECTOR-$PRETRAIN_DIR/projector.safetensors}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/$TP_TAG-finetune}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-16}
LR=${LR:-2e-5}
SAVE_STEPS=${SAVE_STEPS:-1000}
tp_training_defaults

tp_log "stage 2: fine-tune projector + LLM"
tp_show MODEL_SIZE LLM VISION_TOWER PROJECTOR_TYPE SCALE_FACTOR IMAGE_ASPECT_RATIO PATCH_NUM PRETRAINED_PROJECTOR DATA_PATH \
    IMAGE_FOLDER OUTPUT_DIR RUN_NAME DEEPSPEED_CONFIG GLOBAL_BATCH PER_DEVICE_BATCH GRAD_ACCUM LR \
    EPOCHS MAX_LENGTH PACKING LOSS_CHUNK_SIZE NUM_WORKERS REPORT_TO SAVE_STEPS SAVE_TOTAL_LIMIT RESUME \
    EVAL_DATA_PATH EVAL_STEPS

tp_common_args
TP_ARGS+=(
    --version v1
    ${PRETRAINED_PROJECTOR:+--pretrain_mm_mlp_adapter "$PRETRAINED_PROJECTOR"}
    --group_by_modality_length True
)
tp_launch "$@"
