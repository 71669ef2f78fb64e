# shellcheck shell=bash
# shellcheck disable=SC2034  # sets variables (GRAD_ACCUM, TP_TAG, ...) that the stage scripts read
# Shared launcher for scripts/pretrain.sh, scripts/finetune.sh and scripts/finetune_lora.sh.
# It is sourced, not run: it cds to the repository root, resolves the cluster layout from the
# environment, and `tp_launch "$@"` starts `python -m tokenpacker_llava.train` with the
# recipe in the array TP_ARGS, then EXTRA_ARGS, then the script's own arguments (the last
# occurrence of an option wins, so both override the recipe).
#
# Cluster environment (all optional; docs/cluster.md has examples):
#   LAUNCHER         torchrun (default) | deepspeed | srun
#   NNODES           nodes (default 1)                 NODE_RANK    this node (default 0)
#   MASTER_ADDR      node 0's address (127.0.0.1)      MASTER_PORT  (29500)
#   GPUS_PER_NODE    default: CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE, `nvidia-smi -L`, else 1
#   Under SLURM (SLURM_JOB_ID set, LAUNCHER unset, srun or deepspeed), NNODES, NODE_RANK and
#   MASTER_ADDR default to SLURM_NNODES, SLURM_NODEID and the first host of
#   SLURM_JOB_NODELIST, and MASTER_PORT to 20000 + SLURM_JOB_ID % 10000.
#     LAUNCHER unset: one torchrun on this node; run the script once per node
#                     (`srun --ntasks-per-node=1 scripts/finetune.sh`).
#     LAUNCHER=srun:  run the script once (from the batch script); it starts one torchrun
#                     per node itself with `srun` (c10d rendezvous on MASTER_ADDR:MASTER_PORT).
#   HOSTFILE, HOSTS  deepspeed launcher with NNODES > 1: an existing hostfile, or hosts
#                    ("h1,h2" / "h1 h2"; else the SLURM node list) written to a temporary one
#   LAUNCHER_ARGS    options for the launcher itself (torchrun / deepspeed / srun), split on spaces
#   SHUTDOWN_TIMEOUT seconds torchrun gives workers to finish after SIGTERM/SIGUSR1 (300)
#   PYTHON           interpreter (default python)   TRAIN_MODULE (tokenpacker_llava.train)
#   EXTRA_ARGS       training options appended after the recipe, split on spaces
#   DRY_RUN=1        print the settings (stderr) and the command (stdout, one line) and exit

TP_SCRIPT=$(basename "${BASH_SOURCE[1]:-${BASH_SOURCE[0]}}")
TP_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$TP_REPO_ROOT" || exit 1

tp_log() { printf '[%s] %s\n' "$TP_SCRIPT" "$*" >&2; }
tp_die() {
    printf '[%s] error: %s\n' "$TP_SCRIPT" "$*" >&2
    exit 2
}
tp_is_uint() { [[ ${1:-} =~ ^[0-9]+$ ]]; }
tp_require_positive() { # NAME...: each variable must be a positive integer
    local name
    for name in "$@"; do
        [[ ${!name:-} =~ ^[1-9][0-9]*$ ]] || tp_die "$name='${!name:-}' must be a positive integer"
    done
}

# ---------------------------------------------------------------- SLURM node lists
# Split a SLURM node list on the commas that are outside brackets: a[1-2],b -> "a[1-2]" "b".
_tp_split_nodelist() {
    local list=$1 current="" char i depth=0
    for ((i = 0; i < ${#list}; i++)); do
        char=${list:i:1}
        case $char in
            '[') depth=$((depth + 1)) ;;
            ']') depth=$((depth - 1)) ;;
        esac
        if [[ $char == , ]] && ((depth == 0)); then
            printf '%s\n' "$current"
            current=""
        else
            current+=$char
        fi
    done
    if [[ -n $current ]]; then printf '%s\n' "$current"; fi
}

# Expand one element: gpu[01-03,7]-ib -> gpu01-ib gpu02-ib gpu03-ib gpu7-ib (zero padding kept).
_tp_expand_host() {
    local element=$1
    if [[ $element != *'['* ]]; then
        printf '%s\n' "$element"
        return
    fi
    local prefix=${element%%\[*} rest=${element#*\[}
    local inner=${rest%%\]*} suffix=${rest#*\]}
    local -a items tails
    local item low high n tail
    mapfile -t tails < <(_tp_expand_host "$suffix")
    IFS=, read -ra items <<<"$inner"
    for item in "${items[@]}"; do
        low=${item%%-*}
        high=${item#*-}
        if ! tp_is_uint "$low" || ! tp_is_uint "$high"; then
            printf '%s\n' "$element" # not a range we understand: leave it to the user
            return
        fi
        for ((n = 10#$low; n <= 10#$high; n++)); do
            for tail in "${tails[@]}"; do
                printf '%s%0*d%s\n' "$prefix" "${#low}" "$n" "$tail"
            done
        done
    done
}

# All hosts of a SLURM node list, one per line: `scontrol show hostnames`, or our own parser
# (plain ranges, as SLURM writes them) where scontrol is not installed.
tp_expand_nodelist() {
    local list=$1 element
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$list"
        return
    fi
    while IFS= read -r element; do
        _tp_expand_host "$element"
    done < <(_tp_split_nodelist "$list")
}

# ---------------------------------------------------------------- cluster layout
tp_count_gpus() {
    local -a devices
    local device count=0
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
        for device in "${devices[@]}"; do
            if [[ -n $device && $device != -1 && $device != NoDevFiles ]]; then count=$((count + 1)); fi
        done
        if ((count > 0)); then
            echo "$count"
            return
        fi
    fi
    if tp_is_uint "${SLURM_GPUS_ON_NODE:-}" && ((SLURM_GPUS_ON_NODE > 0)); then
        echo "$SLURM_GPUS_ON_NODE"
        return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
        if tp_is_uint "$count" && ((count > 0)); then
            echo "$count"
            return
        fi
    fi
    echo 1
}

TP_SLURM=0
TP_NODELIST=""
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    case ${LAUNCHER:-} in
        "" | srun | deepspeed) TP_SLURM=1 ;;
    esac
fi
LAUNCHER=${LAUNCHER:-torchrun}
case $LAUNCHER in
    torchrun | deepspeed | srun) ;;
    *) tp_die "LAUNCHER='$LAUNCHER': choose torchrun, deepspeed or srun" ;;
esac
if ((TP_SLURM)); then
    NNODES=${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    TP_NODELIST=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    if [[ -z ${MASTER_ADDR:-} ]] && [[ -n $TP_NODELIST ]] && ((NNODES > 1)); then
        MASTER_ADDR=$(tp_expand_nodelist "$TP_NODELIST")
        MASTER_ADDR=${MASTER_ADDR%%$'\n'*} # the first host (no `| head`: SIGPIPE under pipefail)
    fi
    if [[ -z ${MASTER_PORT:-} ]] && tp_is_uint "$SLURM_JOB_ID"; then
        MASTER_PORT=$((20000 + 10#$SLURM_JOB_ID % 10000))
    fi
fi
if [[ $LAUNCHER == srun ]] && ! ((TP_SLURM)); then
    tp_die "LAUNCHER=srun needs a SLURM allocation (SLURM_JOB_ID is not set)"
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(tp_count_gpus)}
PYTHON=${PYTHON:-python}
TRAIN_MODULE=${TRAIN_MODULE:-tokenpacker_llava.train}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
tp_require_positive NNODES GPUS_PER_NODE MASTER_PORT
if ! tp_is_uint "$NODE_RANK" || ((NODE_RANK >= NNODES)); then
    tp_die "NODE_RANK=$NODE_RANK must be in [0, NNODES=$NNODES)"
fi
tp_is_uint "$SHUTDOWN_TIMEOUT" || tp_die "SHUTDOWN_TIMEOUT='$SHUTDOWN_TIMEOUT' must be a number of seconds"

# ---------------------------------------------------------------- recipe helpers
# tp_grad_accum GLOBAL_BATCH PER_DEVICE_BATCH -> GRAD_ACCUM (exact, or a clear error).
tp_grad_accum() {
    local global=$1 per_device=$2 world step lower hint="" p
    world=$((GPUS_PER_NODE * NNODES))
    step=$((per_device * world))
    if ((global % step != 0)); then
        lower=$((global / step * step))
        if ((lower > 0)); then hint="GLOBAL_BATCH=$lower or $((lower + step))"; else hint="GLOBAL_BATCH=$step"; fi
        for ((p = per_device - 1; p > 0; p--)); do # the largest per-device batch that fits
            if ((global % (p * world) == 0)); then
                hint+=", or PER_DEVICE_BATCH=$p (gradient accumulation $((global / (p * world))))"
                break
            fi
        done
        tp_die "GLOBAL_BATCH=$global is not a multiple of PER_DEVICE_BATCH=$per_device x GPUS_PER_NODE=$GPUS_PER_NODE x NNODES=$NNODES = $step, so gradient accumulation would not be a whole number. Use $hint."
    fi
    GRAD_ACCUM=$((global / step))
}

# wandb when it is configured (WANDB_API_KEY or WANDB_MODE set, and not disabled), else none.
tp_default_report_to() {
    if [[ ${WANDB_MODE:-} == disabled ]]; then
        echo none
    elif [[ -n ${WANDB_API_KEY:-} || -n ${WANDB_MODE:-} ]]; then
        echo wandb
    else
        echo none
    fi
}

# Model settings shared by both stages. MODEL_SIZE (7b, 13b) picks LLM unless LLM is set.
tp_model_defaults() {
    MODEL_SIZE=${MODEL_SIZE:-7b}
    if [[ -z ${LLM:-} ]]; then
        case $MODEL_SIZE in
            7b | 13b) LLM=lmsys/vicuna-${MODEL_SIZE}-v1.5 ;;
            *) tp_die "MODEL_SIZE='$MODEL_SIZE': choose 7b or 13b, or set LLM to a model id or folder" ;;
        esac
    fi
    VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
    PROJECTOR_TYPE=${PROJECTOR_TYPE:-tokenpacker}
    # 2 -> 144 visual tokens, 3 -> 64, 4 -> 36; only TokenPacker downsamples (empty: not passed).
    if [[ $PROJECTOR_TYPE == tokenpacker ]]; then
        SCALE_FACTOR=${SCALE_FACTOR-2}
    else
        SCALE_FACTOR=${SCALE_FACTOR:-}
    fi
    # Images: pad (LLaVA-1.5) or slice (TokenPacker-HD: up to PATCH_NUM = 9, 16 or 25 tiles plus a
    # global view; a 3 x 3 image takes 1450 tokens at 144 per view, so raise MAX_LENGTH for 16/25).
    IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-pad}
    local hd=""
    if [[ $IMAGE_ASPECT_RATIO == slice ]]; then
        PATCH_NUM=${PATCH_NUM:-9}
        hd=-hd$PATCH_NUM
    else
        PATCH_NUM=${PATCH_NUM:-}
    fi
    DATA_ROOT=${DATA_ROOT:-./playground/data}
    # Name shared by the stages' output folders: tokenpacker-7b-s2, mlp2x_gelu-13b, tokenpacker-7b-s2-hd9 ...
    TP_TAG=$PROJECTOR_TYPE-$MODEL_SIZE${SCALE_FACTOR:+-s$SCALE_FACTOR}$hd
}

# Training settings shared by both stages (the stage script sets its own values first).
tp_training_defaults() {
    DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-configs/zero2.json}
    EPOCHS=${EPOCHS:-1}
    MAX_LENGTH=${MAX_LENGTH:-2048}
    NUM_WORKERS=${NUM_WORKERS:-4}
    REPORT_TO=${REPORT_TO:-$(tp_default_report_to)}
    SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-1}
    PACKING=${PACKING:-True} # padding-free rows (flash-attn varlen, or per-sample SDPA without it)
    LOSS_CHUNK_SIZE=${LOSS_CHUNK_SIZE-2048} # loss without the full logits; empty: the LLM's own loss
    RESUME=${RESUME-auto} # empty: start over (no --resume_from_checkpoint)
    EVAL_DATA_PATH=${EVAL_DATA_PATH:-} # held-out data: its loss every EVAL_STEPS and at the end
    EVAL_STEPS=${EVAL_STEPS:-$SAVE_STEPS}
    RUN_NAME=${RUN_NAME:-$(basename "$OUTPUT_DIR")}
    tp_require_positive GLOBAL_BATCH PER_DEVICE_BATCH
    tp_grad_accum "$GLOBAL_BATCH" "$PER_DEVICE_BATCH"
}

tp_show() { # NAME...: print the resolved settings
    local name
    for name in "$@"; do
        printf '[%s]   %-20s %s\n' "$TP_SCRIPT" "$name" "${!name:-}" >&2
    done
}

# The recipe options both stages share, into TP_ARGS (the stage script adds its own).
tp_common_args() {
    local -a data_paths eval_paths eval_args=()
    read -ra data_paths <<<"$DATA_PATH" # several files: "a.json b.json:0.5"
    if [[ -n "$EVAL_DATA_PATH" ]]; then
        read -ra eval_paths <<<"$EVAL_DATA_PATH"
        eval_args=(--eval_data_path "${eval_paths[@]}" --eval_strategy steps --eval_steps "$EVAL_STEPS"
            --per_device_eval_batch_size "$PER_DEVICE_BATCH")
    fi
    TP_ARGS=(
        --deepspeed "$DEEPSPEED_CONFIG"
        --model_name_or_path "$LLM"
        --vision_tower "$VISION_TOWER"
        --mm_projector_type "$PROJECTOR_TYPE"
        ${SCALE_FACTOR:+--scale_factor "$SCALE_FACTOR"}
        --mm_vision_select_layer -2
        --mm_vision_select_feature patch
        --data_path "${data_paths[@]}"
        --image_folder "$IMAGE_FOLDER"
        --image_aspect_ratio "$IMAGE_ASPECT_RATIO"
        ${PATCH_NUM:+--patch_num "$PATCH_NUM"}
        --lazy_preprocess True
        --bf16 True
        --tf32 True
        --output_dir "$OUTPUT_DIR"
        --run_name "$RUN_NAME"
        --num_train_epochs "$EPOCHS"
        --per_device_train_batch_size "$PER_DEVICE_BATCH"
        --gradient_accumulation_steps "$GRAD_ACCUM"
        --learning_rate "$LR"
        --weight_decay 0.
        --warmup_steps 0.03
        --lr_scheduler_type cosine
        --logging_steps 1
        --save_strategy steps
        --save_steps "$SAVE_STEPS"
        --save_total_limit "$SAVE_TOTAL_LIMIT"
        --model_max_length "$MAX_LENGTH"
        --packing "$PACKING"
        ${LOSS_CHUNK_SIZE:+--loss_chunk_size "$LOSS_CHUNK_SIZE"}
        --gradient_checkpointing True
        --dataloader_num_workers "$NUM_WORKERS"
        --report_to "$REPORT_TO"
        ${RESUME:+--resume_from_checkpoint "$RESUME"}
        ${eval_args[@]+"${eval_args[@]}"}
    )
}

# ---------------------------------------------------------------- launch
_tp_hostfile() { # write (or reuse) the deepspeed hostfile; sets TP_HOSTFILE (and MASTER_ADDR)
    local -a hosts
    local host
    if [[ -n ${HOSTFILE:-} ]]; then
        [[ -f $HOSTFILE ]] || tp_die "HOSTFILE=$HOSTFILE does not exist"
        TP_HOSTFILE=$HOSTFILE
        if [[ $MASTER_ADDR == 127.0.0.1 || $MASTER_ADDR == localhost ]]; then
            MASTER_ADDR=$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")
            [[ -n $MASTER_ADDR ]] || tp_die "HOSTFILE=$HOSTFILE lists no host"
        fi
        return
    fi
    if [[ -n ${HOSTS:-} ]]; then
        read -ra hosts <<<"${HOSTS//,/ }"
    elif [[ -n ${TP_NODELIST:-} ]]; then
        mapfile -t hosts < <(tp_expand_nodelist "$TP_NODELIST")
    else
        tp_die "LAUNCHER=deepspeed with NNODES=$NNODES needs HOSTFILE (lines 'host slots=$GPUS_PER_NODE') or HOSTS='host0,host1,...'"
    fi
    ((${#hosts[@]} >= NNODES)) || tp_die "NNODES=$NNODES but only ${#hosts[@]} host(s) given: ${hosts[*]}"
    TP_HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/tokenpacker-hostfile.XXXXXX")
    trap 'rm -f "$TP_HOSTFILE"' EXIT
    for host in "${hosts[@]:0:NNODES}"; do
        printf '%s slots=%s\n' "$host" "$GPUS_PER_NODE"
    done >"$TP_HOSTFILE"
    if [[ $MASTER_ADDR == 127.0.0.1 || $MASTER_ADDR == localhost ]]; then
        MASTER_ADDR=${hosts[0]}
    fi
}

tp_launch() { # tp_launch "$@": run TP_ARGS + EXTRA_ARGS + "$@" under the chosen launcher
    local -a extra launcher_args cmd
    read -ra extra <<<"${EXTRA_ARGS:-}"
    read -ra launcher_args <<<"${LAUNCHER_ARGS:-}"
    TP_HOSTFILE=""
    case $LAUNCHER in
        torchrun)
            if ((TP_SLURM && NNODES > 1)) && [[ -z ${SLURM_STEP_ID:-} ]]; then
                tp_log "warning: NNODES=$NNODES but this is not an srun step: start the script on every node" \
                    "(srun --ntasks-per-node=1 $TP_SCRIPT) or run it once with LAUNCHER=srun"
            fi
            if ((NNODES > 1)) && [[ $MASTER_ADDR == 127.0.0.1 || $MASTER_ADDR == localhost ]]; then
                tp_die "NNODES=$NNODES: set MASTER_ADDR to the address of node 0 (every node runs this script with its own NODE_RANK)"
            fi
            cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
                --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
                "${launcher_args[@]}" -m "$TRAIN_MODULE")
            ;;
        srun)
            if ((NNODES > 1)) && [[ $MASTER_ADDR == 127.0.0.1 ]]; then
                tp_die "LAUNCHER=srun with NNODES=$NNODES: cannot find node 0 (set SLURM_JOB_NODELIST or MASTER_ADDR)"
            fi
            cmd=(srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
                "${launcher_args[@]}"
                "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
                --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${SLURM_JOB_ID}"
                -m "$TRAIN_MODULE")
            ;;
        deepspeed)
            cmd=("$PYTHON" -m deepspeed.launcher.runner)
            if ((NNODES > 1)); then
                ((NODE_RANK == 0)) || tp_die "the deepspeed launcher starts every node (over ssh/pdsh) from node 0: run it there only (NODE_RANK=$NODE_RANK)"
                _tp_hostfile
                cmd+=(--hostfile "$TP_HOSTFILE" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR")
            fi
            cmd+=(--num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT" "${launcher_args[@]}"
                --module "$TRAIN_MODULE")
            ;;
    esac
    cmd+=("${TP_ARGS[@]}" "${extra[@]}" "$@")

    local origin=""
    if ((TP_SLURM)); then origin=" (SLURM job $SLURM_JOB_ID)"; fi
    tp_log "cluster: LAUNCHER=$LAUNCHER NNODES=$NNODES NODE_RANK=$NODE_RANK GPUS_PER_NODE=$GPUS_PER_NODE MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT$origin"
    if [[ -n $TP_HOSTFILE ]]; then
        tp_log "hostfile $TP_HOSTFILE:"
        sed 's/^/    /' "$TP_HOSTFILE" >&2
    fi
    # torchrun forwards SIGUSR1 (SLURM's advance warning) to the workers, which checkpoint,
    # and waits SHUTDOWN_TIMEOUT seconds for them; SIGUSR1 is otherwise ignored rather than
    # fatal for the launcher (the training processes install their own handler).
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
    export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-$SHUTDOWN_TIMEOUT}
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$SHUTDOWN_TIMEOUT}
    if [[ ${DRY_RUN:-0} != 0 ]]; then
        printf '%q ' "${cmd[@]}" | sed 's/ $//'
        echo
        exit 0
    fi
    tp_log "running: ${cmd[*]}"
    trap '' USR1
    if [[ -n $TP_HOSTFILE ]]; then
        "${cmd[@]}" # not exec: the EXIT trap removes the temporary hostfile
    else
        exec "${cmd[@]}"
    fi
}
