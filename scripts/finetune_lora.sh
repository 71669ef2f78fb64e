#!/usr/bin/env bash
# Stage 2 with LoRA: train the projector and LoRA adapters on the LLM (LLaVA-1.5's LoRA recipe:
# r 128, alpha 256, lr 2e-4, projector lr 2e-5), starting from stage 1's projector.
# Reference batch: 8 GPUs x 16 = 128, template v1, ZeRO-2, 1 epoch, cosine. Every setting is
# an environment variable (scripts/launch.sh has the shared and cluster ones); arguments go on
# to `python -m tokenpacker_llava.train` and win over the recipe. See docs/cluster.md.
#   LORA_R=64 LORA_ALPHA=128 scripts/finetune_lora.sh
#   scripts/finetune_lora.sh --bits 4          # QLoRA
set -euo pipefail
# shellcheck source=scripts/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

tp_model_defaults
DATA_PATH=${DATA_PATH:-$DATA_ROOT/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$DATA_ROOT} # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
PRETRAIN_DIR=${PRETRAIN_DIR:-./checkpoints/$TP_TAG-pretrain}
PRETRAINED_PROJECTOR=${PRETRAINED_PROJECTOR-$PRETRAIN_DIR/projector.safetensors}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/$TP_TAG-finetune-lora}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-16}
LR=${LR:-2e-4}
MM_PROJECTOR_LR=${MM_PROJECTOR_LR:-2e-5}
LORA_R=${LORA_R:-128}
LORA_ALPHA=${LORA_ALPHA:-256}
SAVE_STEPS=${SAVE_STEPS:-1000}
tp_training_defaults

tp_log "stage 2: fine-tune projector + LoRA on the LLM"
tp_show MODEL_SIZE LLM VISION_TOWER PROJECTOR_TYPE SCALE_FACTOR IMAGE_ASPECT_RATIO PATCH_NUM PRETRAINED_PROJECTOR DATA_PATH \
    IMAGE_FOLDER OUTPUT_DIR RUN_NAME DEEPSPEED_CONFIG GLOBAL_BATCH PER_DEVICE_BATCH GRAD_ACCUM LR \
    MM_PROJECTOR_LR LORA_R LORA_ALPHA EPOCHS MAX_LENGTH PACKING LOSS_CHUNK_SIZE NUM_WORKERS REPORT_TO SAVE_STEPS \
    SAVE_TOTAL_LIMIT RESUME EVAL_DATA_PATH EVAL_STEPS

tp_common_args
TP_ARGS+=(
    --version v1
    ${PRETRAINED_PROJECTOR:+--pretrain_mm_mlp_adapter "$PRETRAINED_PROJECTOR"}
    --group_by_modality_length True
    --lora_enable True
    --lora_r "$LORA_R"
    --lora_alpha "$LORA_ALPHA"
    --mm_projector_lr "$MM_PROJECTOR_LR"
)
tp_launch "$@"
