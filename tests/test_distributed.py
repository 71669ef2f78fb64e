"""Real multi-process training on CPU: DeepSpeed ZeRO-2 / ZeRO-3 over gloo, 2 processes.

Each run goes through torchrun and the shipped configs/zero*.json, exactly as on a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_util import LORA_ARGS, make_parts, stage1_args, stage2_args

from tokenpacker_llava import TokenPackerLlavaForConditionalGeneration

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_ranks_env(**extra: str) -> dict[str, str]:
    """The environment of local CPU ranks (gloo), plus ``extra``."""
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        # DeepSpeed compiles its CPU ops once; keep them in the repo's ignored cache.
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def torchrun(
    argv: list[str], nproc: int = 2, program: tuple[str, ...] = ("-m", "tokenpacker_llava.train")
) -> subprocess.CompletedProcess:
    env = cpu_ranks_env()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *program,
        *argv,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def logged(checkpoint: Path, key: str) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


def logged_losses(checkpoint: Path) -> list[float]:
    return logged(checkpoint, "loss")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    return make_parts(tmp_path_factory.mktemp("dist_parts"))


@pytest.fixture(scope="module")
def zero2_stage1(parts, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("z2_stage1")
    torchrun(stage1_args(parts, output, "--deepspeed", "configs/zero2.json"))
    return output


def packed_stage2(parts, stage1: Path, output: Path, deepspeed_config: str, *extra: str) -> Path:
    """Stage 2 on packed rows under ``deepspeed_config``, with ``extra`` options."""
    projector = stage1 / "projector.safetensors"
    torchrun(
        stage2_args(parts, output, projector, "--deepspeed", deepspeed_config, "--packing", "True", *extra)
    )
    return output


# The projector's own learning rate (5x the LLM's) in both ZeRO-3 runs: the offload run must keep
# the parameter groups to match.
MM_PROJECTOR_LR = ("--mm_projector_lr", "1e-3")


@pytest.fixture(scope="module")
def zero3_stage2(parts, zero2_stage1, tmp_path_factory) -> Path:
    # The chunked loss (as the stage scripts default): the LM head's weight is partitioned and
    # gathered by the model's own forward/backward, never by the head's.
    # Held-out loss every 2 steps, split over the ranks, the chunked loss computing it too.
    output = tmp_path_factory.mktemp("z3_stage2")
    return packed_stage2(
        parts,
        zero2_stage1,
        output,
        "configs/zero3.json",
        "--loss_chunk_size",
        "16",
        *("--eval_data_path", str(parts["captions"]), "--eval_strategy", "steps", "--eval_steps", "2"),
        *MM_PROJECTOR_LR,
    )


def test_zero2_stage1_then_zero3_stage2(zero2_stage1, zero3_stage2) -> None:
    assert (zero2_stage1 / "checkpoint-4" / ".complete").is_file()
    assert len(logged_losses(zero2_stage1 / "checkpoint-4")) == 4
    losses = logged_losses(zero3_stage2 / "checkpoint-4")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    state = json.loads((zero3_stage2 / "trainer_state.json").read_text())
    evaluated = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    assert evaluated.keys() == {2, 4} and all(0 < loss < 20 for loss in evaluated.values())
    results = json.loads((zero3_stage2 / "eval_results.json").read_text())
    assert results["eval_loss"] == evaluated[4]
    # ZeRO-3 gathered the 16-bit weights for the final save: a complete, loadable model.
    model, info = TokenPackerLlavaForConditionalGeneration.from_pretrained(
        zero3_stage2, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(p.numel() > 0 for p in model.parameters())
    stage1 = load_file(zero2_stage1 / "projector.safetensors")
    final = load_file(zero3_stage2 / "projector.safetensors")
    assert stage1.keys() == final.keys()
    assert not torch.equal(stage1["mlp.2.weight"], final["mlp.2.weight"])  # trained further in stage 2


def test_zero3_loads_a_projector_into_partitioned_parameters(
    parts, zero2_stage1, zero3_stage2, tmp_path
) -> None:
    # Continuing from a saved model builds everything under zero.Init, projector included:
    # the parameters are empty shards (LLaVA's torch.Size([0]) failure) until gathered.
    output = tmp_path / "continued"
    argv = stage2_args(
        parts, output, zero2_stage1 / "projector.safetensors", "--deepspeed", "configs/zero3.json"
    )
    argv[argv.index("--model_name_or_path") + 1] = str(zero3_stage2)
    result = torchrun([*argv, "--max_steps", "1", "--learning_rate", "0", "--save_strategy", "no"])
    assert "loaded projector weights" in result.stderr + result.stdout
    stage1 = load_file(zero2_stage1 / "projector.safetensors")
    final = load_file(output / "projector.safetensors")
    for key, value in stage1.items():
        torch.testing.assert_close(final[key], value, msg=key)  # lr 0: exactly what was loaded


def resumed_losses(args: list[str], full: Path, tmp_path: Path, step: int = 2, last: int = 4) -> list[float]:
    """Losses of a run resumed from ``full``'s checkpoint at ``step``, copied to a fresh folder
    (a run stopped after that step is exactly that checkpoint), up to step ``last``."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    args = list(args)
    args[args.index("--output_dir") + 1] = str(resumed)
    torchrun([*args, "--resume_from_checkpoint", "auto"])
    return logged_losses(resumed / f"checkpoint-{last}")


def test_zero2_resume_continues_exactly(parts, zero2_stage1, tmp_path) -> None:
    # 30 rows, 8 per step over the 2 ranks: 4 steps per epoch; resumed at step 6, in the middle of
    # the second epoch, whose length-grouped order must be epoch 1's, not epoch 0's again.
    full = tmp_path / "full"
    args = stage2_args(
        parts, full, zero2_stage1 / "projector.safetensors", "--deepspeed", "configs/zero2.json"
    )
    args[args.index("--max_steps") + 1] = "8"
    torchrun(args)
    expected = logged_losses(full / "checkpoint-8")
    assert len(expected) == 8
    assert resumed_losses(args, full, tmp_path, step=6, last=8) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_stage1_deepspeed_checkpoints_hold_only_the_projector_and_resume_exactly(
    parts, zero2_stage1, config, tmp_path
) -> None:
    if config == "zero2":
        full, args = zero2_stage1, stage1_args(parts, zero2_stage1, "--deepspeed", "configs/zero2.json")
    else:
        full = tmp_path / "full"
        args = stage1_args(parts, full, "--deepspeed", "configs/zero3.json")
        torchrun(args)
    # DeepSpeed's module states would otherwise hold the frozen tower and LLM, and its frozen
    # fragments a second copy: 27 GB per checkpoint at 7B.
    # (ZeRO-2 writes mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_N_... per rank.)
    files = sorted((full / "checkpoint-2").glob("global_step*/*model_states.pt"))
    assert len(files) == (1 if config == "zero2" else 2)
    for states in files:
        saved = torch.load(states, map_location="cpu", weights_only=False)  # our own file
        assert saved["module"] and all(key.startswith("projector.") for key in saved["module"])
        assert saved.get("frozen_param_fragments") is None
    # Resuming restores the projector and its optimizer; the frozen parts come from their
    # pretrained sources, as when the run started.
    expected = logged_losses(full / "checkpoint-4")
    assert resumed_losses(args, full, tmp_path) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_lora_under_zero3(parts, zero2_stage1, tmp_path) -> None:
    # With the chunked loss, as finetune_lora.sh trains: peft wraps the model whose forward
    # gathers the (frozen, partitioned) LM head.
    output = tmp_path / "lora"
    torchrun(
        stage2_args(
            parts,
            output,
            zero2_stage1 / "projector.safetensors",
            "--deepspeed",
            "configs/zero3.json",
            *LORA_ARGS,
            "--max_steps",
            "2",
            "--loss_chunk_size",
            "16",
        )
    )
    assert (output / "adapter_model.safetensors").is_file()
    assert len(logged_losses(output / "checkpoint-2")) == 2


def test_plain_ddp_stage2(parts, zero2_stage1, tmp_path) -> None:
    # No DeepSpeed: torch DDP over gloo. Text-only batches still use the projector, so DDP
    # never meets an unused trainable parameter; the chunked loss hands the LM head's gradient
    # to DDP's hooks like any other.
    output = tmp_path / "ddp"
    torchrun(stage2_args(parts, output, zero2_stage1 / "projector.safetensors", "--loss_chunk_size", "16"))
    losses = logged_losses(output / "checkpoint-4")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert TokenPackerLlavaForConditionalGeneration.from_pretrained(output).config.num_image_tokens == 36


def test_zero3_offload_with_the_llms_own_loss_matches_zero3_with_the_chunked_loss(
    parts, zero2_stage1, zero3_stage2, tmp_path
) -> None:
    # The shipped offload config: parameters and Adam states on the CPU (DeepSpeedCPUAdam,
    # compiled once into .cache, built by the trainer with its parameter groups), and the LLM's
    # own loss over full logits. Same data, init, schedule and projector learning rate as the
    # ZeRO-3 run with the chunked loss: the same losses and gradient norms (which include the LM
    # head's gradient, computed by the chunked loss there).
    output = tmp_path / "offload"
    projector = zero2_stage1 / "projector.safetensors"
    result = torchrun(
        stage2_args(
            parts, output, projector, "--deepspeed", "configs/zero3_offload.json", "--packing", "True"
        )
        + list(MM_PROJECTOR_LR)
    )
    assert "optimizer DeepSpeedCPUAdam, parameter groups: projector: 9 tensors, lr 0.001" in (
        result.stdout + result.stderr
    )
    for key in ("loss", "grad_norm"):
        expected = logged(zero3_stage2 / "checkpoint-4", key)
        assert logged(output / "checkpoint-4", key) == pytest.approx(expected, rel=1e-4, abs=1e-5), key
    model, info = TokenPackerLlavaForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = load_file(zero3_stage2 / "projector.safetensors")
    for key, value in load_file(output / "projector.safetensors").items():
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-5, msg=key)


# The training entry point plus a callback that writes which samples this rank's data loader
# yields (the Trainer's own loader, as prepared by accelerate).
RECORD_SHARDS = """
import json, sys
from pathlib import Path
from transformers import TrainerCallback
from tokenpacker_llava.train import run
from tokenpacker_llava.training.arguments import parse_arguments, validate

class RecordShard(TrainerCallback):
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        ids = [sample["id"] for sample in train_dataloader.dataset]
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, f"ids_rank{args.process_index}.json").write_text(json.dumps(ids))

model_args, data_args, training_args = parse_arguments(sys.argv[1:])
validate(model_args, data_args, training_args)
run(model_args, data_args, training_args, callbacks=[RecordShard()])
"""


def test_streaming_splits_the_stream_over_the_ranks(parts, tmp_path) -> None:
    # Every caption row goes to exactly one rank, as many on every rank: the ranks read the same
    # stream, shuffled alike (the default buffer), and keep alternate batches of it.
    script = tmp_path / "record_shards.py"
    script.write_text(RECORD_SHARDS)
    output = tmp_path / "streaming"
    argv = stage1_args(parts, output, "--streaming", "True", "--max_steps", "3", "--save_strategy", "no")
    torchrun(argv, program=(str(script),))
    ranks = [json.loads((output / f"ids_rank{rank}.json").read_text()) for rank in (0, 1)]
    rows = [record["id"] for record in json.loads(parts["captions"].read_text())]
    assert len(ranks[0]) == len(ranks[1]) == len(rows) // 2
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(rows)
    assert ranks[0] + ranks[1] != rows  # shuffled
    assert len(logged_losses(output)) == 3


def test_pretrain_script_under_the_deepspeed_launcher(parts, tmp_path) -> None:
    # The cluster path end to end: scripts/pretrain.sh -> `deepspeed` launcher (2 local
    # processes) -> ZeRO-2 from configs/zero2.json, with the recipe's GPU flags switched off.
    output = tmp_path / "ds_launcher"
    env = cpu_ranks_env(
        LAUNCHER="deepspeed",
        GPUS_PER_NODE="2",
        NNODES="1",
        MASTER_PORT=str(free_port()),
        PYTHON=sys.executable,
        LLM=str(parts["llm"]),
        VISION_TOWER=str(parts["vision"]),
        DATA_PATH=str(parts["captions"]),
        IMAGE_FOLDER=str(parts["images"]),
        OUTPUT_DIR=str(output),
        PER_DEVICE_BATCH="2",
        GLOBAL_BATCH="4",
        MAX_LENGTH="128",
        NUM_WORKERS="0",
        REPORT_TO="none",
        RESUME="",
    )
    cpu = ["--bf16", "False", "--tf32", "False", "--use_cpu", "True", "--gradient_checkpointing", "False"]
    command = [
        "bash",
        "scripts/pretrain.sh",
        *cpu,
        "--max_steps",
        "2",
        "--save_strategy",
        "no",
        "--seed",
        "1",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    logs = result.stdout + result.stderr
    assert "deepspeed.launcher.runner" in logs and "--deepspeed configs/zero2.json" in logs
    assert "dist_world_size=2" in logs and logs.count("exits successfully") == 2  # both ranks ran
    projector = load_file(output / "projector.safetensors")
    assert "clip_attn.in_proj_weight" in projector and all(
        torch.isfinite(t).all() for t in projector.values()
    )
