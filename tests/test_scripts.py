"""The training launch scripts (scripts/*.sh) and DeepSpeed configs (configs/*.json).

Every script run here is a DRY_RUN (the command is printed, nothing starts) or runs a fake
``python`` that records its arguments, with a PATH that holds only the few tools the scripts
use, so no GPU, nvidia-smi, SLURM or network is needed and nothing on the machine leaks in.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
STAGES = ("pretrain", "finetune", "finetune_lora")
CONFIGS = ("zero2", "zero3", "zero3_offload")
BASH = shutil.which("bash")
TOOLS = ("basename", "dirname", "mktemp", "sed", "awk", "head", "grep", "rm", "cat")
TRAIN_MODULE = "tokenpacker_llava.train"

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


@pytest.fixture(scope="module")
def toolbin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH with only the tools the scripts need: no scontrol, srun, nvidia-smi or python."""
    folder = tmp_path_factory.mktemp("bin")
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed by scripts/launch.sh"
        (folder / tool).symlink_to(found)
    return folder


def fake_tool(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def run(toolbin: Path, tmp_path: Path):
    """run(stage, env={...}, args=[...]) -> result with .cmd (the printed command, split)."""

    def _run(
        stage: str,
        env: dict[str, str | None] | None = None,
        args: tuple[str, ...] | list[str] = (),
        extra_path: Path | None = None,
        cwd: Path | None = None,
        dry: bool = True,
        check: bool = True,
    ) -> SimpleNamespace:
        full_env = {
            "PATH": f"{extra_path}:{toolbin}" if extra_path else str(toolbin),
            "HOME": str(tmp_path),
            "TMPDIR": str(tmp_path),
            "GPUS_PER_NODE": "8",
        }
        if dry:
            full_env["DRY_RUN"] = "1"
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        result = subprocess.run(
            [BASH, str(SCRIPTS / f"{stage}.sh"), *args],
            env=full_env,
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        cmd = shlex.split(lines[-1]) if (dry and result.returncode == 0 and lines) else []
        return SimpleNamespace(rc=result.returncode, stdout=result.stdout, stderr=result.stderr, cmd=cmd)

    return _run


def train_args(cmd: list[str]) -> list[str]:
    """The arguments given to the training module (after `-m/--module tokenpacker_llava.train`)."""
    return cmd[cmd.index(TRAIN_MODULE) + 1 :]


def launcher_args(cmd: list[str]) -> list[str]:
    return cmd[: cmd.index(TRAIN_MODULE) + 1]


def option(args: list[str], name: str) -> str | None:
    """The last value given to `name` (argparse: the last occurrence wins)."""
    positions = [i for i, arg in enumerate(args) if arg == name]
    if not positions:
        return None
    return args[positions[-1] + 1]


def values(args: list[str], name: str) -> list[str]:
    """All values after the last `name` up to the next option (for nargs='+')."""
    start = max(i for i, arg in enumerate(args) if arg == name) + 1
    end = start
    while end < len(args) and not args[end].startswith("--"):
        end += 1
    return args[start:end]


# ---------------------------------------------------------------- static checks


@pytest.mark.parametrize("script", [*STAGES, "launch"])
def test_bash_syntax(script: str) -> None:
    result = subprocess.run([BASH, "-n", str(SCRIPTS / f"{script}.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck() -> None:
    scripts = [str(SCRIPTS / f"{name}.sh") for name in (*STAGES, "launch")]
    scripts.append(str(ROOT / "benchmarks" / "gpu.sh"))
    result = subprocess.run(
        ["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_stage_scripts_are_executable(stage: str) -> None:
    assert os.access(SCRIPTS / f"{stage}.sh", os.X_OK)


# ---------------------------------------------------------------- the recipes


def test_pretrain_recipe_single_node(run) -> None:
    result = run("pretrain")
    assert launcher_args(result.cmd) == [
        "python", "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
        "--nproc_per_node", "8", "--master_addr", "127.0.0.1", "--master_port", "29500",
        "-m", TRAIN_MODULE,
    ]  # fmt: skip
    args = train_args(result.cmd)
    expected = {
        "--deepspeed": "configs/zero2.json",
        "--model_name_or_path": "lmsys/vicuna-7b-v1.5",
        "--vision_tower": "openai/clip-vit-large-patch14-336",
        "--mm_projector_type": "tokenpacker",
        "--scale_factor": "2",
        "--version": "plain",
        "--tune_mm_mlp_adapter": "True",
        "--mm_vision_select_layer": "-2",
        "--image_folder": "./playground/data/LLaVA-Pretrain/images",
        "--image_aspect_ratio": "pad",
        "--learning_rate": "1e-3",
        "--per_device_train_batch_size": "32",
        "--gradient_accumulation_steps": "1",
        "--num_train_epochs": "1",
        "--lr_scheduler_type": "cosine",
        "--warmup_steps": "0.03",
        "--weight_decay": "0.",
        "--bf16": "True",
        "--tf32": "True",
        "--model_max_length": "2048",
        "--gradient_checkpointing": "True",
        "--packing": "True",
        "--loss_chunk_size": "2048",
        "--dataloader_num_workers": "4",
        "--report_to": "none",
        "--resume_from_checkpoint": "auto",
        "--output_dir": "./checkpoints/tokenpacker-7b-s2-pretrain",
        "--run_name": "tokenpacker-7b-s2-pretrain",
    }
    assert {name: option(args, name) for name in expected} == expected
    assert values(args, "--data_path") == ["./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"]
    for absent in ("--pretrain_mm_mlp_adapter", "--group_by_modality_length", "--lora_enable"):
        assert absent not in args
    # the resolved settings are printed
    assert "GRAD_ACCUM" in result.stderr and "lmsys/vicuna-7b-v1.5" in result.stderr


def test_finetune_recipe(run) -> None:
    args = train_args(run("finetune").cmd)
    expected = {
        "--version": "v1",
        "--learning_rate": "2e-5",
        "--per_device_train_batch_size": "16",
        "--gradient_accumulation_steps": "1",
        "--group_by_modality_length": "True",
        "--pretrain_mm_mlp_adapter": "./checkpoints/tokenpacker-7b-s2-pretrain/projector.safetensors",
        "--image_folder": "./playground/data",
        "--deepspeed": "configs/zero2.json",
        "--output_dir": "./checkpoints/tokenpacker-7b-s2-finetune",
    }
    assert {name: option(args, name) for name in expected} == expected
    assert values(args, "--data_path") == ["./playground/data/llava_v1_5_mix665k.json"]
    assert "--tune_mm_mlp_adapter" not in args and "--lora_enable" not in args


def test_finetune_lora_recipe(run) -> None:
    args = train_args(run("finetune_lora").cmd)
    expected = {
        "--version": "v1",
        "--lora_enable": "True",
        "--lora_r": "128",
        "--lora_alpha": "256",
        "--mm_projector_lr": "2e-5",
        "--learning_rate": "2e-4",
        "--per_device_train_batch_size": "16",
        "--gradient_accumulation_steps": "1",
        "--group_by_modality_length": "True",
        "--pretrain_mm_mlp_adapter": "./checkpoints/tokenpacker-7b-s2-pretrain/projector.safetensors",
        "--output_dir": "./checkpoints/tokenpacker-7b-s2-finetune-lora",
    }
    assert {name: option(args, name) for name in expected} == expected
    assert "--tune_mm_mlp_adapter" not in args


@pytest.mark.parametrize("stage", STAGES)
def test_entry_point_parser_accepts_every_option(run, stage: str) -> None:
    """Whatever the scripts pass, `tokenpacker-llava train`'s parser knows (no GPU: argparse only)."""
    arguments = pytest.importorskip("tokenpacker_llava.training.arguments")
    args = train_args(run(stage).cmd)
    namespace = arguments.build_parser().parse_args(args)
    assert (ROOT / namespace.deepspeed).is_file()
    assert namespace.bf16 is True and namespace.gradient_checkpointing is True
    assert namespace.tune_mm_mlp_adapter is (stage == "pretrain")


def test_13b_picks_vicuna_13b_and_stage2_finds_stage1(run) -> None:
    env = {"MODEL_SIZE": "13b"}
    pretrain = train_args(run("pretrain", env).cmd)
    assert option(pretrain, "--model_name_or_path") == "lmsys/vicuna-13b-v1.5"
    for stage in ("finetune", "finetune_lora"):
        finetune = train_args(run(stage, env).cmd)
        assert option(finetune, "--model_name_or_path") == "lmsys/vicuna-13b-v1.5"
        assert option(finetune, "--pretrain_mm_mlp_adapter") == (
            option(pretrain, "--output_dir") + "/projector.safetensors"
        )
    # the scale factor is part of the names, so 64- and 144-token runs do not collide
    other = train_args(run("finetune", {"MODEL_SIZE": "13b", "SCALE_FACTOR": "3"}).cmd)
    assert option(other, "--scale_factor") == "3"
    assert option(other, "--pretrain_mm_mlp_adapter") == (
        "./checkpoints/tokenpacker-13b-s3-pretrain/projector.safetensors"
    )


def test_slice_mode_passes_through_and_names_the_runs(run) -> None:
    arguments = pytest.importorskip("tokenpacker_llava.training.arguments")
    env = {"IMAGE_ASPECT_RATIO": "slice"}
    pretrain = train_args(run("pretrain", env).cmd)
    assert option(pretrain, "--image_aspect_ratio") == "slice" and option(pretrain, "--patch_num") == "9"
    assert option(pretrain, "--output_dir") == "./checkpoints/tokenpacker-7b-s2-hd9-pretrain"
    finetune = train_args(run("finetune", {**env, "PATCH_NUM": "16"}).cmd)
    assert option(finetune, "--patch_num") == "16"
    assert option(finetune, "--pretrain_mm_mlp_adapter") == (
        "./checkpoints/tokenpacker-7b-s2-hd16-pretrain/projector.safetensors"
    )
    namespace = arguments.build_parser().parse_args(finetune)
    assert namespace.image_aspect_ratio == "slice" and namespace.patch_num == 16
    assert "--patch_num" not in train_args(run("finetune").cmd)  # pad mode: unchanged recipe


def test_unknown_model_size_fails(run) -> None:
    result = run("pretrain", {"MODEL_SIZE": "70b"}, check=False)
    assert result.rc != 0 and "MODEL_SIZE='70b'" in result.stderr
    # ... unless LLM names the model
    args = train_args(run("pretrain", {"MODEL_SIZE": "70b", "LLM": "/models/llama-70b"}).cmd)
    assert option(args, "--model_name_or_path") == "/models/llama-70b"


# ---------------------------------------------------------------- batch arithmetic


@pytest.mark.parametrize(
    ("gpus", "nnodes", "per_device", "expected"),
    [("8", "1", "32", "1"), ("2", "1", "32", "4"), ("1", "1", "32", "8"), ("4", "2", "8", "4")],
)
def test_gradient_accumulation(run, gpus: str, nnodes: str, per_device: str, expected: str) -> None:
    env = {"GPUS_PER_NODE": gpus, "NNODES": nnodes, "PER_DEVICE_BATCH": per_device, "MASTER_ADDR": "10.0.0.1"}
    args = train_args(run("pretrain", env).cmd)
    assert option(args, "--gradient_accumulation_steps") == expected
    assert option(args, "--per_device_train_batch_size") == per_device


def test_non_divisible_batch_fails_clearly(run) -> None:
    result = run("pretrain", {"GPUS_PER_NODE": "3"}, check=False)
    assert result.rc != 0 and result.stdout == ""
    assert "GLOBAL_BATCH=256 is not a multiple of PER_DEVICE_BATCH=32 x GPUS_PER_NODE=3" in result.stderr
    assert "Use GLOBAL_BATCH=192 or 288" in result.stderr
    # the reference stage-2 batch on 16 GPUs needs a smaller per-device batch
    result = run("finetune", {"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, check=False)
    assert result.rc != 0 and "= 256" in result.stderr
    assert "Use GLOBAL_BATCH=256, or PER_DEVICE_BATCH=8 (gradient accumulation 1)." in result.stderr


@pytest.mark.parametrize("bad", [{"GLOBAL_BATCH": "0"}, {"PER_DEVICE_BATCH": "x"}, {"GPUS_PER_NODE": "-1"}])
def test_bad_numbers_fail(run, bad: dict[str, str]) -> None:
    result = run("pretrain", bad, check=False)
    assert result.rc != 0 and "must be a positive integer" in result.stderr


# ---------------------------------------------------------------- launchers


def test_torchrun_multi_node(run) -> None:
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "PER_DEVICE_BATCH": "16"}
    cmd = run("pretrain", env).cmd
    assert launcher_args(cmd) == [
        "python", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
        "--nproc_per_node", "8", "--master_addr", "10.0.0.1", "--master_port", "29500",
        "-m", TRAIN_MODULE,
    ]  # fmt: skip
    assert option(train_args(cmd), "--gradient_accumulation_steps") == "1"


def test_torchrun_multi_node_needs_master_addr_and_valid_rank(run) -> None:
    result = run("pretrain", {"NNODES": "2", "PER_DEVICE_BATCH": "16"}, check=False)
    assert result.rc != 0 and "set MASTER_ADDR" in result.stderr
    result = run("pretrain", {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, check=False)
    assert result.rc != 0 and "NODE_RANK=2 must be in [0, NNODES=2)" in result.stderr


def test_deepspeed_launcher_single_node(run) -> None:
    cmd = run("finetune", {"LAUNCHER": "deepspeed", "MASTER_PORT": "29611"}).cmd
    assert launcher_args(cmd) == [
        "python", "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--master_port", "29611",
        "--module", TRAIN_MODULE,
    ]  # fmt: skip


def test_deepspeed_launcher_multi_node_writes_a_hostfile(run, tmp_path: Path) -> None:
    env = {"LAUNCHER": "deepspeed", "NNODES": "2", "HOSTS": "node-a,node-b,node-c", "PER_DEVICE_BATCH": "8"}
    result = run("finetune", env)
    cmd = launcher_args(result.cmd)
    hostfile = option(cmd, "--hostfile")
    assert cmd[:3] == ["python", "-m", "deepspeed.launcher.runner"]
    assert option(cmd, "--num_nodes") == "2" and option(cmd, "--master_addr") == "node-a"
    assert option(cmd, "--num_gpus") == "8" and cmd[-2:] == ["--module", TRAIN_MODULE]
    assert Path(hostfile).parent == tmp_path  # under TMPDIR, removed when the script exits
    assert not Path(hostfile).exists()
    assert "node-a slots=8" in result.stderr and "node-b slots=8" in result.stderr
    assert "node-c" not in result.stderr

    own = tmp_path / "myhosts"
    own.write_text("# comment\nw0 slots=8\nw1 slots=8\n")
    cmd = run("finetune", {**env, "HOSTS": None, "HOSTFILE": str(own)}).cmd
    assert option(cmd, "--hostfile") == str(own) and option(cmd, "--master_addr") == "w0"
    assert own.exists()


def test_deepspeed_launcher_multi_node_errors(run) -> None:
    env = {"LAUNCHER": "deepspeed", "NNODES": "2", "PER_DEVICE_BATCH": "8"}
    result = run("finetune", env, check=False)
    assert result.rc != 0 and "needs HOSTFILE" in result.stderr
    result = run("finetune", {**env, "HOSTS": "a,b", "NODE_RANK": "1"}, check=False)
    assert result.rc != 0 and "run it there only" in result.stderr
    result = run("finetune", {**env, "HOSTS": "a"}, check=False)
    assert result.rc != 0 and "only 1 host(s)" in result.stderr


def test_unknown_launcher_fails(run) -> None:
    result = run("pretrain", {"LAUNCHER": "mpirun"}, check=False)
    assert result.rc != 0 and "LAUNCHER='mpirun'" in result.stderr


SLURM_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "GPUS_PER_NODE": "4",
}


def test_slurm_one_torchrun_per_node(run) -> None:
    result = run("pretrain", SLURM_ENV)  # no scontrol on PATH: the node list is parsed here
    assert launcher_args(result.cmd) == [
        "python", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
        "--nproc_per_node", "4", "--master_addr", "gpu-07", "--master_port", "23456",
        "-m", TRAIN_MODULE,
    ]  # fmt: skip
    assert option(train_args(result.cmd), "--gradient_accumulation_steps") == "1"
    assert "SLURM job 123456" in result.stderr
    assert "not an srun step" in result.stderr  # the batch script itself would start one node only
    assert "not an srun step" not in run("pretrain", {**SLURM_ENV, "SLURM_STEP_ID": "0"}).stderr


def test_slurm_uses_scontrol_when_present(run, tmp_path: Path) -> None:
    fake_tool(tmp_path / "fake", "scontrol", 'printf "alpha\\nbeta\\n"')
    cmd = run("pretrain", SLURM_ENV, extra_path=tmp_path / "fake").cmd
    assert option(cmd, "--master_addr") == "alpha"


def test_slurm_environment_can_be_overridden(run) -> None:
    cmd = run("pretrain", {**SLURM_ENV, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "31000"}).cmd
    assert option(cmd, "--master_addr") == "10.1.1.1" and option(cmd, "--master_port") == "31000"
    # an explicit LAUNCHER=torchrun ignores SLURM: everything comes from NNODES, NODE_RANK, ...
    cmd = run("pretrain", {**SLURM_ENV, "LAUNCHER": "torchrun", "PER_DEVICE_BATCH": "8"}).cmd
    assert option(cmd, "--nnodes") == "1" and option(cmd, "--node_rank") == "0"


def test_slurm_srun_launcher(run) -> None:
    cmd = run(
        "finetune", {**SLURM_ENV, "LAUNCHER": "srun", "SLURM_NODEID": "0", "PER_DEVICE_BATCH": "16"}
    ).cmd
    assert launcher_args(cmd) == [
        "srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
        "python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-07:23456", "--rdzv_id", "123456",
        "-m", TRAIN_MODULE,
    ]  # fmt: skip
    result = run("finetune", {"LAUNCHER": "srun"}, check=False)
    assert result.rc != 0 and "needs a SLURM allocation" in result.stderr


def test_slurm_deepspeed_launcher_uses_the_node_list(run) -> None:
    env = {**SLURM_ENV, "LAUNCHER": "deepspeed", "SLURM_NODEID": "0", "PER_DEVICE_BATCH": "16"}
    result = run("finetune", env)
    assert option(result.cmd, "--num_nodes") == "2" and option(result.cmd, "--master_addr") == "gpu-07"
    assert "gpu-07 slots=4" in result.stderr and "gpu-08 slots=4" in result.stderr


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("a,b", ["a", "b"]),
        ("gpu[01-03,10]", ["gpu01", "gpu02", "gpu03", "gpu10"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("x[1-2]-ib,y5", ["x1-ib", "x2-ib", "y5"]),
        ("r[1-2]n[3-4]", ["r1n3", "r1n4", "r2n3", "r2n4"]),
    ],
)
def test_nodelist_expansion_without_scontrol(
    toolbin: Path, tmp_path: Path, nodelist: str, hosts: list[str]
) -> None:
    result = subprocess.run(
        [
            BASH,
            "-c",
            'set -euo pipefail; source "$0"; tp_expand_nodelist "$1"',
            SCRIPTS / "launch.sh",
            nodelist,
        ],
        env={"PATH": str(toolbin), "GPUS_PER_NODE": "1", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == hosts


@pytest.mark.parametrize(
    ("env", "fake_smi", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, False, "3"),
        ({"CUDA_VISIBLE_DEVICES": "4,5"}, True, "2"),
        ({"SLURM_GPUS_ON_NODE": "6"}, True, "6"),
        ({}, True, "4"),
        ({}, False, "1"),
    ],
)
def test_gpu_count_detection(run, tmp_path: Path, env: dict[str, str], fake_smi: bool, expected: str) -> None:
    gpus = "".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n" for i in range(4))
    fake_tool(tmp_path / "fake", "nvidia-smi", f'printf "{gpus}"')
    extra = (tmp_path / "fake") if fake_smi else None
    env = {**env, "GPUS_PER_NODE": None, "GLOBAL_BATCH": "48", "PER_DEVICE_BATCH": "1"}
    cmd = run("pretrain", env, extra_path=extra).cmd
    assert option(cmd, "--nproc_per_node") == expected
    assert option(train_args(cmd), "--gradient_accumulation_steps") == str(48 // int(expected))


# ---------------------------------------------------------------- overrides


def test_environment_and_argument_overrides(run) -> None:
    env = {
        "LR": "5e-4",
        "EPOCHS": "2",
        "DATA_PATH": "/data/a.json /data/b.jsonl:0.5",
        "IMAGE_FOLDER": "/data/images",
        "OUTPUT_DIR": "/ckpt/run1",
        "PROJECTOR_TYPE": "mlp2x_gelu",
        "DEEPSPEED_CONFIG": "configs/zero3.json",
        "VISION_TOWER": "google/siglip-so400m-patch14-384",
        "MAX_LENGTH": "4096",
        "NUM_WORKERS": "8",
        "SAVE_STEPS": "250",
        "SAVE_TOTAL_LIMIT": "3",
        "EXTRA_ARGS": "--max_steps 10 --seed 7",
        "PYTHON": "/opt/venv/bin/python",
    }
    cmd = run("pretrain", env, args=["--learning_rate", "1e-4", "--seed", "11"]).cmd
    assert cmd[0] == "/opt/venv/bin/python"
    args = train_args(cmd)
    assert option(args, "--learning_rate") == "1e-4"  # arguments win over LR
    assert args[-4:] == ["--learning_rate", "1e-4", "--seed", "11"]  # ... because they come last
    assert option(args, "--seed") == "11" and option(args, "--max_steps") == "10"
    assert values(args, "--data_path") == ["/data/a.json", "/data/b.jsonl:0.5"]
    assert "--scale_factor" not in args  # only TokenPacker downsamples
    expected = {
        "--num_train_epochs": "2",
        "--image_folder": "/data/images",
        "--output_dir": "/ckpt/run1",
        "--run_name": "run1",
        "--mm_projector_type": "mlp2x_gelu",
        "--deepspeed": "configs/zero3.json",
        "--vision_tower": "google/siglip-so400m-patch14-384",
        "--model_max_length": "4096",
        "--dataloader_num_workers": "8",
        "--save_steps": "250",
        "--save_total_limit": "3",
    }
    assert {name: option(args, name) for name in expected} == expected
    arguments = pytest.importorskip("tokenpacker_llava.training.arguments")
    namespace = arguments.build_parser().parse_args(args)
    assert namespace.learning_rate == 1e-4 and namespace.max_steps == 10 and namespace.seed == 11
    assert namespace.data_path == ["/data/a.json", "/data/b.jsonl:0.5"]


def test_finetune_overrides(run) -> None:
    args = train_args(run("finetune", {"PRETRAIN_DIR": "/ckpt/stage1"}).cmd)
    assert option(args, "--pretrain_mm_mlp_adapter") == "/ckpt/stage1/projector.safetensors"
    args = train_args(run("finetune", {"PRETRAINED_PROJECTOR": "/p/projector.safetensors"}).cmd)
    assert option(args, "--pretrain_mm_mlp_adapter") == "/p/projector.safetensors"
    args = train_args(run("finetune", {"PRETRAINED_PROJECTOR": ""}).cmd)
    assert "--pretrain_mm_mlp_adapter" not in args
    args = train_args(run("finetune", {"PACKING": "False", "LOSS_CHUNK_SIZE": ""}).cmd)
    assert option(args, "--packing") == "False" and "--loss_chunk_size" not in args
    assert option(train_args(run("finetune", {"LOSS_CHUNK_SIZE": "1024"}).cmd), "--loss_chunk_size") == "1024"
    args = train_args(
        run("finetune_lora", {"LORA_R": "64", "LORA_ALPHA": "16", "MM_PROJECTOR_LR": "1e-5"}).cmd
    )
    assert (option(args, "--lora_r"), option(args, "--lora_alpha"), option(args, "--mm_projector_lr")) == (
        "64",
        "16",
        "1e-5",
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "none"),
        ({"WANDB_API_KEY": "secret"}, "wandb"),
        ({"WANDB_MODE": "offline"}, "wandb"),
        ({"WANDB_API_KEY": "secret", "WANDB_MODE": "disabled"}, "none"),
        ({"WANDB_API_KEY": "secret", "REPORT_TO": "tensorboard"}, "tensorboard"),
    ],
)
def test_report_to_default(run, env: dict[str, str], expected: str) -> None:
    assert option(train_args(run("finetune", env).cmd), "--report_to") == expected


def test_resume(run) -> None:
    assert option(train_args(run("pretrain").cmd), "--resume_from_checkpoint") == "auto"
    args = train_args(run("pretrain", {"RESUME": "/ckpt/checkpoint-500"}).cmd)
    assert option(args, "--resume_from_checkpoint") == "/ckpt/checkpoint-500"
    assert "--resume_from_checkpoint" not in train_args(run("pretrain", {"RESUME": ""}).cmd)


@pytest.mark.parametrize("stage", STAGES)
def test_held_out_evaluation(run, stage: str) -> None:
    assert "--eval_data_path" not in train_args(run(stage).cmd)  # off unless asked for
    args = train_args(run(stage, {"EVAL_DATA_PATH": "val.json more_val.jsonl", "SAVE_STEPS": "300"}).cmd)
    assert values(args, "--eval_data_path") == ["val.json", "more_val.jsonl"]
    assert option(args, "--eval_strategy") == "steps" and option(args, "--eval_steps") == "300"
    assert option(args, "--per_device_eval_batch_size") == option(args, "--per_device_train_batch_size")
    args = train_args(run(stage, {"EVAL_DATA_PATH": "val.json", "EVAL_STEPS": "50"}).cmd)
    assert option(args, "--eval_steps") == "50"


def test_runs_from_any_directory(run, tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    assert run("finetune", cwd=elsewhere).cmd == run("finetune", cwd=ROOT).cmd


# ---------------------------------------------------------------- really running (a fake python)


def _recording_python(folder: Path, record: Path) -> Path:
    """A `python` that records its cwd, arguments, signal setup and any --hostfile's contents."""
    body = f"""
{{
  echo "cwd=$PWD"
  echo "signals=$PET_SIGNALS_TO_HANDLE timeout=$PET_SHUTDOWN_TIMEOUT"
  if [[ -r /proc/$$/status ]]; then grep SigIgn /proc/$$/status; fi
  printf 'arg=%s\\n' "$@"
  while [[ $# -gt 0 ]]; do
    if [[ $1 == --hostfile ]]; then echo "hostfile-exists"; cat "$2"; fi
    shift
  done
}} > {record}
exit 3
"""
    return fake_tool(folder, "python", body)


def test_real_launch_execs_the_launcher(run, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    python = _recording_python(tmp_path / "fake", record)
    result = run("pretrain", {"PYTHON": str(python)}, args=["--max_steps", "2"], dry=False, check=False)
    assert result.rc == 3  # the launcher's status comes back
    lines = record.read_text().splitlines()
    assert lines[0] == f"cwd={ROOT}"
    assert lines[1] == "signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 timeout=300"
    ignored = [line.split()[1] for line in lines if line.startswith("SigIgn:")]
    if ignored:  # Linux: SIGUSR1 cannot kill the launcher before it installs its own handler
        assert int(ignored[0], 16) & (1 << (signal.SIGUSR1 - 1))
    args = [line[len("arg=") :] for line in lines if line.startswith("arg=")]
    assert args[:3] == ["-m", "torch.distributed.run", "--nnodes"]
    assert args[-2:] == ["--max_steps", "2"]
    assert "running:" in result.stderr


def test_real_deepspeed_multi_node_hostfile_lives_until_exit(run, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    python = _recording_python(tmp_path / "fake", record)
    env = {
        "PYTHON": str(python),
        "LAUNCHER": "deepspeed",
        "NNODES": "2",
        "HOSTS": "h0 h1",
        "PER_DEVICE_BATCH": "8",
    }
    result = run("finetune", env, dry=False, check=False)
    assert result.rc == 3
    text = record.read_text()
    assert "hostfile-exists\nh0 slots=8\nh1 slots=8\n" in text
    assert not list(tmp_path.glob("tokenpacker-hostfile.*"))


# ---------------------------------------------------------------- DeepSpeed configs


def _load(name: str) -> dict:
    return json.loads((ROOT / "configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_follows_training_arguments(name: str) -> None:
    config = _load(name)
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert config[key] == "auto", key
    assert config["gradient_clipping"] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert config["zero_optimization"]["reduce_bucket_size"] == "auto"
    # the Trainer's cosine schedule (--lr_scheduler_type) must not be replaced by DeepSpeed's
    assert "scheduler" not in config
    if "optimizer" in config:
        assert all(value == "auto" for value in config["optimizer"]["params"].values())


def test_config_stages() -> None:
    zero2, zero3, offload = (_load(name)["zero_optimization"] for name in CONFIGS)
    assert zero2["stage"] == 2 and zero3["stage"] == 3 and offload["stage"] == 3
    for zero in (zero3, offload):
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["stage3_prefetch_bucket_size"] == "auto"
        assert zero["stage3_param_persistence_threshold"] == "auto"
    for kind in ("offload_optimizer", "offload_param"):
        assert offload[kind] == {"device": "cpu", "pin_memory": True}
    # No config names an optimizer: a DeepSpeed optimizer block would replace the trainer's
    # parameter groups (--mm_projector_lr) with one flat group; under offload the trainer builds
    # DeepSpeedCPUAdam itself.
    assert all("optimizer" not in _load(name) for name in CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_in_transformers_and_deepspeed(name: str, tmp_path: Path) -> None:
    """transformers fills every "auto" from TrainingArguments and the model; DeepSpeed then parses it."""
    pytest.importorskip("deepspeed")
    from conftest import tiny_config
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import (
        HfTrainerDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-5,
        weight_decay=0.0,
        warmup_steps=0.03,
        max_grad_norm=1.0,
        report_to="none",
    )
    args.bf16 = True  # as the scripts pass; TrainingArguments itself would want a GPU for it
    hf_config = HfTrainerDeepSpeedConfig(str(ROOT / "configs" / f"{name}.json"))
    try:
        assert is_deepspeed_zero3_enabled() is (name != "zero2")
        assert hf_config.is_offload() is (name == "zero3_offload")
        hf_config.trainer_config_process(args)
        # the composed model's config has no hidden_size: transformers uses text_config's
        model = SimpleNamespace(config=tiny_config())
        hf_config.trainer_config_finalize(args, model, num_training_steps=1000)
        filled = hf_config.config
    finally:
        del hf_config
        unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(filled)
    hidden = tiny_config().text_config.hidden_size
    assert filled["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
    assert filled["train_batch_size"] == 8 and filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False

    parsed = DeepSpeedConfig(filled)  # world size 1 without torch.distributed
    assert parsed.train_batch_size == 8
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.zero_optimization_stage == (2 if name == "zero2" else 3)
    assert parsed.gradient_clipping == 1.0
    if name != "zero2":
        assert parsed.zero_config.gather_16bit_weights_on_model_save is True
    if name == "zero3_offload":
        assert parsed.zero_config.offload_param.device == "cpu"
        assert parsed.zero_config.offload_optimizer.pin_memory is True
