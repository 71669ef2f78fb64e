"""Training end to end on tiny local parts: both stages, exact resume, interrupted saves,
preemption, option validation, and the stage-1 -> stage-2 projector hand-off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_util import LORA_ARGS, losses, make_parts, stage1_args, stage2_args, train
from transformers import TrainerCallback

from tokenpacker_llava import TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.train import main
from tokenpacker_llava.training.arguments import parse_arguments
from tokenpacker_llava.training.checkpoints import (
    COMPLETE_MARKER,
    latest_complete_checkpoint,
    resolve_resume,
    rotate,
    unmark_complete,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    return make_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def stage1_dir(parts, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("stage1")
    assert main(stage1_args(parts, output)) == 0
    return output


class StopAt(TrainerCallback):
    """Ends training after `step` (a checkpoint is saved there by save_steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class SendSignal(TrainerCallback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_stage1_trains_only_the_projector_and_saves_resumable_checkpoints(parts, stage1_dir) -> None:
    config = json.loads((stage1_dir / "training_config.json").read_text())
    assert config["stage"] == "pretrain" and config["template"] == "plain"
    projector = load_file(stage1_dir / "projector.safetensors")
    assert "clip_attn.in_proj_weight" in projector and "mlp.2.weight" in projector
    for step in (2, 4):
        checkpoint = stage1_dir / f"checkpoint-{step}"
        for name in (COMPLETE_MARKER, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
            assert (checkpoint / name).is_file(), name
        assert not (checkpoint / "model.safetensors").exists()  # frozen backbones are not copied
    assert latest_complete_checkpoint(stage1_dir).name == "checkpoint-4"


def test_stage2_loads_the_stage1_projector_and_saves_a_full_model(parts, stage1_dir, tmp_path) -> None:
    output = tmp_path / "stage2"
    trainer = train(stage2_args(parts, output, stage1_dir / "projector.safetensors", "--max_steps", "2"))
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    model = TokenPackerLlavaForConditionalGeneration.from_pretrained(output)
    assert (output / "model.safetensors").is_file() and (output / "preprocessor_config.json").is_file()
    assert model.config.projector_type == "tokenpacker" and model.config.num_image_tokens == 36
    # The LLM was trained (full fine-tuning) and the vision tower was not.
    pretrained = TokenPackerLlavaForConditionalGeneration.from_pretrained_parts(
        str(parts["llm"]), str(parts["vision"]), image_token_id=model.config.image_token_id
    )
    assert not torch.equal(
        model.language_model.model.layers[0].mlp.up_proj.weight,
        pretrained.language_model.model.layers[0].mlp.up_proj.weight,
    )
    assert torch.equal(
        model.vision_tower.model.encoder.layers[0].mlp.fc1.weight,
        pretrained.vision_tower.model.encoder.layers[0].mlp.fc1.weight,
    )


REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.abc, sys
    class HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tokenpacker_llava":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, HidePackage())
    import torch, transformers
    folder, batch_file, out = sys.argv[1:4]
    batch = torch.load(batch_file, weights_only=True)
    logits = {}
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits[auto] = model(**batch).logits
    assert not any(name.startswith("tokenpacker_llava") for name in sys.modules)
    torch.save(logits, out)
    """
)


def test_the_final_folder_loads_without_this_package(parts, stage1_dir, tmp_path) -> None:
    output = tmp_path / "stage2"
    train(stage2_args(parts, output, stage1_dir / "projector.safetensors", "--max_steps", "1"))
    assert (output / "modeling_tokenpacker_llava.py").is_file() and (output / "README.md").is_file()
    model = TokenPackerLlavaForConditionalGeneration.from_pretrained(output).eval()
    ids = [1, 5, 6] + [model.config.image_token_id] * model.num_image_tokens + [7, 8]
    batch = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 48, 48)}
    torch.save(batch, tmp_path / "batch.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            REMOTE_LOAD,
            str(output),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "logits.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(**batch).logits
    for auto, logits in torch.load(tmp_path / "logits.pt", weights_only=True).items():
        assert torch.equal(logits, expected), auto


def test_stage2_rejects_a_projector_trained_for_another_setup(parts, stage1_dir, tmp_path) -> None:
    argv = stage2_args(parts, tmp_path / "out", stage1_dir / "projector.safetensors", "--scale_factor", "3")
    with pytest.raises(ValueError, match="scale_factor: file '2' vs model '3'"):
        train(argv)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_continues_exactly(parts, stage1_dir, tmp_path, stage: str) -> None:
    def args(output: Path, *extra: str) -> list[str]:
        if stage == "pretrain":
            return stage1_args(parts, output, *extra)
        return stage2_args(parts, output, stage1_dir / "projector.safetensors", *extra)

    full = losses(train(args(tmp_path / "full")))
    interrupted = tmp_path / "interrupted"
    first = losses(train(args(interrupted), callbacks=[StopAt(2)]))
    assert len(first) == 2
    second = losses(train(args(interrupted, "--resume_from_checkpoint", "auto")))
    assert len(full) == 4 and len(second) == 4  # steps 1-2 restored from the checkpoint, 3-4 trained
    assert first + second[2:] == pytest.approx(full, rel=1e-5, abs=1e-6)


def test_sigterm_saves_a_checkpoint_and_stops(parts, tmp_path, monkeypatch) -> None:
    output = tmp_path / "preempted"
    trainer = train(
        stage1_args(parts, output, "--max_steps", "8", "--save_steps", "100"),
        callbacks=[SendSignal(3, signal.SIGTERM)],
    )
    assert trainer.state.global_step == 4  # the step running when the signal came, then stop
    assert (output / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert signal.getsignal(signal.SIGTERM) is not None
    # Not the end of the run: no final projector for stage 2 to pick up, and a failing exit code
    # (job dependencies must not fire; the scheduler requeues).
    assert trainer.preempted_by == "SIGTERM"
    assert not (output / "projector.safetensors").exists() and not (output / "train_results.json").exists()
    import tokenpacker_llava.train as entry

    class Stopped:
        preempted_by = "SIGUSR1"

    monkeypatch.setattr(entry, "run", lambda *args: Stopped())
    assert main(stage1_args(parts, output)) == entry.PREEMPTED_EXIT_CODE == 75


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from tokenpacker_llava.training.trainer import TokenPackerTrainer
    from tokenpacker_llava.train import main
    original = TokenPackerTrainer._save_optimizer_and_scheduler
    def dying(self, output_dir):
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: weights saved, optimizer not
        return original(self, output_dir)
    TokenPackerTrainer._save_optimizer_and_scheduler = dying
    main({argv!r})
    """
)


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(parts, tmp_path) -> None:
    output = tmp_path / "killed"
    argv = stage1_args(parts, output, "--max_steps", "6")
    script = KILL_DURING_SAVE.format(tests=str(ROOT / "tests"), argv=argv)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (output / "checkpoint-4").is_dir() and not (output / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert latest_complete_checkpoint(output).name == "checkpoint-2"
    resumed = losses(train(argv + ["--resume_from_checkpoint", "auto"]))
    uninterrupted = losses(train(stage1_args(parts, tmp_path / "full", "--max_steps", "6")))
    # The resumed history holds steps 1-2 from checkpoint-2 and steps 3-6 trained now.
    assert len(resumed) == len(uninterrupted) == 6
    assert resumed == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6)
    assert (output / "checkpoint-6" / COMPLETE_MARKER).is_file()


BAD_OPTIONS = [
    (["--lora_enable", "True"], "--tune_mm_mlp_adapter \\(stage 1\\) and --lora_enable contradict"),
    (["--mm_projector_type", "tokenpackr"], "--mm_projector_type 'tokenpackr'"),
    (["--version", "v9"], "--version 'v9'"),
    (["--bits", "4"], "QLoRA\\) needs --lora_enable"),
    (["--image_aspect_ratio", "square"], "--image_aspect_ratio"),
    (["--mm_use_im_start_end", "True"], "not supported"),
    (["--mm_vision_tower_lr", "1e-5"], "needs --unfreeze_mm_vision_tower"),
    (["--on_bad_sample", "ignore"], "--on_bad_sample"),
    (["--loss_chunk_size", "0"], "--loss_chunk_size 0: must be positive"),
    (["--compile_parts", "llm"], "--compile_parts \\['llm'\\]: choose from"),
    (["--compile_parts", "projector", "--deepspeed", "configs/zero3.json"], "does not work under ZeRO-3"),
    (["--eval_strategy", "steps"], "--eval_strategy steps needs --eval_data_path"),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor: the Trainer's label smoother"),
    (["--save_only_model", "True", "--resume_from_checkpoint", "auto"], "resuming from them is not exact"),
    (["--push_to_hub", "True"], "--push_to_hub uploads a full stage-2 model folder"),
    (["--eval_data_path", "held_out.json"], "--eval_data_path held_out.json: file not found"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_OPTIONS)
def test_bad_options_fail_before_any_model_is_loaded(parts, tmp_path, extra, message, monkeypatch) -> None:
    import tokenpacker_llava.train as entry

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were validated")

    monkeypatch.setattr(entry, "run", no_loading)
    with pytest.raises(ValueError, match=message):
        main(stage1_args(parts, tmp_path / "x", *extra))


class SlowEvaluation(TrainerCallback):
    def on_evaluate(self, args, state, control, **kwargs):
        time.sleep(2.0)


def test_tokens_per_second_leaves_evaluation_time_out(parts, tmp_path) -> None:
    # Step 2 logs, then evaluates (2 s longer than its work); the window logged at step 3 spans
    # that evaluation, yet measures training like the other steps (each well under 2 s).
    argv = stage1_args(
        parts, tmp_path / "out", "--eval_data_path", str(parts["captions"]), "--eval_strategy", "steps"
    )
    argv += ["--eval_steps", "2", "--save_strategy", "no"]
    trainer = train(argv, callbacks=[SlowEvaluation()])
    rates = {e["step"]: e["tokens_per_second"] for e in trainer.state.log_history if "tokens_per_second" in e}
    assert rates.keys() == {1, 2, 3, 4}
    assert rates[3] > 0.5 * min(rates[1], rates[2], rates[4]), rates


def test_rotation_keeps_the_newest_and_the_best_and_a_fresh_start_refuses_old_checkpoints(tmp_path) -> None:
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 5:  # checkpoint-5: being written
            (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("complete\n")
    rotate(tmp_path, 1, protect=[tmp_path / "checkpoint-4", tmp_path / "checkpoint-2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    unmark_complete(tmp_path / "checkpoint-4")  # rewritten from now on: not resumable until marked again
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-2"
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run"):
        resolve_resume(None, tmp_path)
    assert resolve_resume(None, tmp_path / "new") is None


def test_the_best_checkpoint_survives_rotation(parts, stage1_dir, tmp_path) -> None:
    output = tmp_path / "best"
    argv = stage2_args(parts, output, stage1_dir / "projector.safetensors", "--save_steps", "1")
    argv += ["--eval_data_path", str(parts["instructions"]), "--eval_strategy", "steps", "--eval_steps", "1"]
    argv += ["--load_best_model_at_end", "True", "--save_total_limit", "1", "--learning_rate", "5e-2"]
    trainer = train(argv)
    best = Path(trainer.state.best_model_checkpoint)
    # Rotation kept it while training (it used to delete it, and loading it at the end failed);
    # at the end transformers keeps only the best when the limit is 1.
    assert [path.name for path in output.glob("checkpoint-*")] == [best.name]
    assert (best / COMPLETE_MARKER).is_file()


def test_only_the_saving_process_writes_the_projector(tmp_path) -> None:
    from conftest import tiny_model

    from tokenpacker_llava.training.projector_io import save_projector

    model = tiny_model()
    save_projector(model, tmp_path / "other_rank.safetensors", write=False)
    assert not (tmp_path / "other_rank.safetensors").exists()
    assert save_projector(model, tmp_path / "main.safetensors").is_file()


def test_stage2_options_that_would_be_ignored_are_refused(parts, tmp_path) -> None:
    stage2 = stage2_args(parts, tmp_path / "x", None)
    for extra, message in (
        (
            ["--lora_enable", "True", "--unfreeze_mm_vision_tower", "True"],
            "trains and saves only the adapters",
        ),
        (["--lora_enable", "True", "--push_to_hub", "True"], "merge first"),
    ):
        with pytest.raises(ValueError, match=message):
            main([*stage2, *extra])
    with pytest.raises(ValueError, match="stage-1 checkpoints hold the projector only"):
        best = ["--load_best_model_at_end", "True", "--eval_strategy", "steps"]
        main(stage1_args(parts, tmp_path / "y", *best, "--eval_data_path", str(parts["captions"])))


def test_held_out_data_is_read_once(parts, tmp_path) -> None:
    with pytest.raises(ValueError, match="evaluation reads every row once \\(no weights\\)"):
        main(stage1_args(parts, tmp_path / "x", "--eval_data_path", f"{parts['captions']}:2"))


def test_unknown_options_and_config_files(parts, tmp_path) -> None:
    with pytest.raises(ValueError, match="not used by the HfArgumentParser: \\['--no_such_option'"):
        parse_arguments(stage1_args(parts, tmp_path / "x", "--no_such_option", "1"))
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {parts['llm']}\nlearning_rate: 0.005\nscale_factor: 3\n")
    argv = stage1_args(parts, tmp_path / "x")
    argv = argv[2:]  # the model path comes from the file
    model_args, _, training_args = parse_arguments(["--config", str(config), *argv])
    assert model_args.model_name_or_path == str(parts["llm"])
    assert training_args.learning_rate == 1e-3  # the command line wins over the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown option\\(s\\) in the config file: lerning_rate"):
        parse_arguments(["--config", str(bad), *argv])


def test_train_entry_points(parts, tmp_path) -> None:
    from tokenpacker_llava.cli import main as cli

    assert cli(["train", *stage1_args(parts, tmp_path / "sub", "--max_steps", "1")]) == 0
    assert (tmp_path / "sub" / "projector.safetensors").is_file()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenpacker_llava.train",
            *stage1_args(parts, tmp_path / "cli", "--max_steps", "1"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "cli" / "projector.safetensors").is_file()


def test_lora_stage2_and_merge(parts, stage1_dir, tmp_path) -> None:
    from tokenpacker_llava.cli import main as cli

    output = tmp_path / "lora"
    argv = stage2_args(
        parts,
        output,
        stage1_dir / "projector.safetensors",
        *LORA_ARGS,
        "--max_steps",
        "3",
        # The held-out loss through peft's wrapper, computed by the chunked loss (no logits).
        *("--eval_data_path", str(parts["instructions"]), "--loss_chunk_size", "8"),
    )
    trainer = train(argv)
    peft_model = trainer.model
    final_eval = json.loads((output / "eval_results.json").read_text())["eval_loss"]
    trainer.model.use_chunked_loss(None)  # the same evaluation with the LLM's own loss and logits
    assert trainer.evaluate()["eval_loss"] == pytest.approx(final_eval, rel=1e-5)
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("projector.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert not any(n.endswith("up_proj.base_layer.weight") for n in trainable)

    merged_dir = tmp_path / "merged"
    assert cli(["merge-lora", "--run_dir", str(output), "--output_dir", str(merged_dir)]) == 0
    merged = TokenPackerLlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    peft_model.eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )
    trained_projector = load_file(output / "projector.safetensors")
    torch.testing.assert_close(merged.projector.mlp[2].weight, trained_projector["mlp.2.weight"])


def test_wandb_offline(parts, tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    argv = stage1_args(parts, tmp_path / "run", "--max_steps", "2")
    argv[argv.index("--report_to") + 1] = "wandb"
    trainer = train(argv)
    assert len(losses(trainer)) == 2
    wandb.finish()  # flush the run file (written by wandb's service process, so poll briefly)
    wanted = (b"train/loss", b"tokens_per_second", b"visual_token_share")
    records = b""
    for _ in range(100):
        runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
        records = b"".join(path.read_bytes() for run in runs for path in run.glob("*.wandb"))
        if all(key in records for key in wanted):
            break
        time.sleep(0.1)
    assert runs, "no offline wandb run was written"
    # The run file holds the logged metrics, ours included (keys are stored as plain strings).
    assert all(key in records for key in wanted), records[:200]


def test_unfrozen_vision_tower_gets_its_own_learning_rate(parts, stage1_dir, tmp_path) -> None:
    argv = stage2_args(
        parts,
        tmp_path / "vision",
        stage1_dir / "projector.safetensors",
        "--max_steps",
        "1",
        "--unfreeze_mm_vision_tower",
        "True",
        "--mm_vision_tower_lr",
        "1e-5",
        "--mm_projector_lr",
        "3e-4",
    )
    trainer = train(argv)
    by_lr = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            by_lr.setdefault(names[id(parameter)].split(".")[0], set()).add(
                group.get("initial_lr", group["lr"])
            )
    assert by_lr == {"vision_tower": {1e-5}, "projector": {3e-4}, "language_model": {2e-4}}


def test_skip_policy_through_the_entry_point(parts, stage1_dir, tmp_path, caplog, monkeypatch) -> None:
    import tokenpacker_llava.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "SHORTENED_SHOWN", 3)  # the report names 3, counts the rest
    rows = json.loads(parts["instructions"].read_text())
    rows.insert(1, {"id": "no-image-file", "image": "missing.png", "conversations": rows[0]["conversations"]})
    rows.insert(5, {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]})
    data = tmp_path / "with_bad_rows.json"
    data.write_text(json.dumps(rows))
    argv = stage2_args(
        parts, tmp_path / "skip", stage1_dir / "projector.safetensors", "--on_bad_sample", "skip"
    )
    argv[argv.index("--data_path") + 1] = str(data)
    argv[argv.index("--max_steps") + 1] = "9"  # one epoch of 32 rows / 4, and a bit
    with caplog.at_level("WARNING"):
        trainer = train(argv)
    assert len(trainer.skipped_samples) == 2
    assert "2 bad sample(s) were skipped during training" in caplog.text
    # The two-question rows (ins0, ins3, ...) do not fit --model_max_length 160: trained on with
    # their second pair dropped, which is counted, logged on every rank and reported at the end.
    two_pairs = {row["id"] for row in rows if len(row["conversations"]) == 4 and row["id"].startswith("ins")}
    assert len(two_pairs) == 8
    assert {d.split("'")[1] for d in trainer.shortened_samples} == two_pairs
    assert all("dropped 1 turn pair(s)" in d for d in trainer.shortened_samples)
    assert "8 row(s) were shortened to fit --model_max_length 160" in caplog.text
    assert "... and 5 more" in caplog.text
    assert trainer.state.log_history[-2]["shortened_samples"] == 8  # the last step's log
    assert "id 'no-image-file'" in caplog.text and "missing_image" in caplog.text
    assert "id 'no-answer'" in caplog.text and "no_assistant_turn" in caplog.text
    with pytest.raises(Exception, match="row 1, id 'no-image-file': missing_image"):
        argv[argv.index("--on_bad_sample") + 1] = "error"
        argv[argv.index("--output_dir") + 1] = str(tmp_path / "error")
        train(argv)


def test_packed_and_chunked_loss_training_match_padded_training(parts, stage1_dir, tmp_path) -> None:
    # The same batches (same seed and sampler) in either layout, and with the chunked loss: the
    # same losses step by step, through the Trainer (its num_items_in_batch), the packed
    # collator's sample boundaries and sdpa_varlen. The held-out loss too: evaluated every 2
    # steps (the chunked loss computing it without logits), or once at the end.
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(json.loads(parts["instructions"].read_text())[:7]))
    runs, trainers = {}, {}
    for name, extra in (
        ("padded", ["--packing", "False"]),
        ("packed", ["--packing", "True", "--eval_strategy", "steps", "--eval_steps", "2"]),
        (
            "packed, chunked loss",
            ["--packing", "True", "--loss_chunk_size", "7", "--eval_strategy", "steps", "--eval_steps", "2"],
        ),
    ):
        output = tmp_path / name.replace(", ", "-").replace(" ", "_")
        argv = stage2_args(
            parts,
            output,
            stage1_dir / "projector.safetensors",
            "--save_strategy",
            "no",
            "--eval_data_path",
            str(held_out),
            "--per_device_eval_batch_size",
            "3",
        )
        trainers[name] = train([*argv, *extra])
        runs[name] = losses(trainers[name])
    assert len(runs["packed"]) == 4
    for name in ("packed", "packed, chunked loss"):
        assert runs[name] == pytest.approx(runs["padded"], rel=1e-4, abs=1e-5), name

    def eval_losses(name: str) -> dict[int, float]:
        return {e["step"]: e["eval_loss"] for e in trainers[name].state.log_history if "eval_loss" in e}

    assert eval_losses("padded").keys() == {4}  # no --eval_strategy: once, at the end
    for name in ("packed", "packed, chunked loss"):
        assert eval_losses(name).keys() == {2, 4}  # the step-4 evaluation is not repeated at the end
        assert eval_losses(name)[4] == pytest.approx(eval_losses("padded")[4], rel=1e-4), name
    assert eval_losses("packed, chunked loss")[2] == pytest.approx(eval_losses("packed")[2], rel=1e-4)
    assert trainers["padded"]._tokens == 0  # evaluation batches are not counted as training tokens
    output = Path(trainers["packed"].args.output_dir)
    results = json.loads((output / "eval_results.json").read_text())
    assert results["eval_loss"] == eval_losses("packed")[4]
    assert json.loads((output / "train_results.json").read_text())["train_loss"] > 0
    assert (output / "trainer_state.json").is_file()
    assert (output / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_vision_tower_and_projector_train_as_eager(parts, stage1_dir, tmp_path) -> None:
    # torch.compile (inductor, C++ on CPU) of the tower and projector: the same losses step by
    # step, through a change in the number of images (24 rows in batches of 5: the fifth batch
    # has 4 images; the recompile with a dynamic batch), and a saved model whose weights load
    # into an uncompiled one.
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile_parts", "vision_tower", "projector"])):
        argv = stage2_args(parts, tmp_path / name, stage1_dir / "projector.safetensors", *extra)
        argv[argv.index("--per_device_train_batch_size") + 1] = "5"
        argv[argv.index("--max_steps") + 1] = "6"
        runs[name] = train([*argv, "--save_strategy", "no"])
    assert len(losses(runs["eager"])) == 6
    assert losses(runs["compiled"]) == pytest.approx(losses(runs["eager"]), rel=1e-4, abs=1e-5)
    compiled = runs["compiled"].model
    assert compiled.projector._compiled_call_impl is not None
    assert compiled.vision_tower._compiled_call_impl is not None
    saved = TokenPackerLlavaForConditionalGeneration.from_pretrained(tmp_path / "compiled")
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, compiled.state_dict()[key], msg=key)


def test_bf16_without_deepspeed_casts_the_frozen_parts_a_run_does_not_save(
    parts, stage1_dir, tmp_path
) -> None:
    # Stage 1 and LoRA save neither the tower nor the LLM: frozen, they are cast to bf16 once
    # instead of under autocast at every step; what trains stays fp32 for the optimizer.
    def dtypes(module: torch.nn.Module, trainable: bool | None = None) -> set[torch.dtype]:
        return {p.dtype for p in module.parameters() if trainable is None or p.requires_grad == trainable}

    fp32 = train(stage1_args(parts, tmp_path / "fp32", "--save_strategy", "no"))
    bf16 = train(stage1_args(parts, tmp_path / "bf16", "--save_strategy", "no", "--bf16", "True"))
    model = bf16.model
    assert dtypes(model.language_model) == dtypes(model.vision_tower) == {torch.bfloat16}
    assert dtypes(model.projector) == {torch.float32}
    assert losses(bf16) == pytest.approx(losses(fp32), rel=5e-2)  # bf16 matmuls either way

    projector = stage1_dir / "projector.safetensors"
    lora_args = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--bf16", "True")
    lora = train(stage2_args(parts, tmp_path / "lora", projector, *lora_args, "--save_strategy", "no"))
    base = lora.model.get_base_model()
    assert dtypes(base.language_model, trainable=False) == dtypes(base.vision_tower) == {torch.bfloat16}
    assert dtypes(base.language_model, trainable=True) == {torch.float32}  # the adapters
    assert all(torch.isfinite(torch.tensor(losses(lora))))

    # A full stage-2 model is saved with its frozen tower: nothing is cast.
    full = train(stage2_args(parts, tmp_path / "full", projector, "--bf16", "True", "--max_steps", "1"))
    assert dtypes(full.model.vision_tower) == dtypes(full.model.language_model) == {torch.float32}
