"""``tokenpacker-llava merge-lora`` on tiny LoRA runs: the merged folder holds the projector the run
ended with (here a frozen stage-1 projector, which the adapter does not carry) and the run's image
mode (slice mode's separator ids), so it computes what the run's peft model computes and loads
for inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_util import LORA_ARGS, make_parts, stage1_args, stage2_args, train

from tokenpacker_llava import TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.cli import main as cli
from tokenpacker_llava.data.records import Turn
from tokenpacker_llava.inference.loading import load_model
from tokenpacker_llava.tokenization import slice_separator_ids

LORA = (
    *LORA_ARGS,
    "--max_steps",
    "2",
    "--save_strategy",
    "no",
)
IMAGE_MODE_KEYS = ("image_aspect_ratio", "patch_num", "slice_separator_ids")


def merge(run_dir: Path, merged_dir: Path) -> Path:
    assert cli(["merge-lora", "--run_dir", str(run_dir), "--output_dir", str(merged_dir)]) == 0
    return merged_dir


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    parts = make_parts(tmp_path_factory.mktemp("parts"))
    # Images of several sizes so that the slice-mode run sees more than one grid (48 px tiles).
    for index, size in enumerate([(48, 48), (96, 96), (150, 140), (40, 150)]):
        Image.new("RGB", size, (40 * index, 200, 30)).save(parts["images"] / f"{index:03d}.png")
    return parts


@pytest.fixture(scope="module")
def stage1_dir(parts, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("stage1")
    train(stage1_args(parts, output, "--max_steps", "2", "--save_strategy", "no"))
    return output


@pytest.fixture(scope="module")
def frozen_projector_run(parts, stage1_dir, tmp_path_factory):
    """A LoRA run with the stage-1 projector frozen (the adapter holds no projector copy), merged."""
    root = tmp_path_factory.mktemp("frozen")
    argv = stage2_args(
        parts, root / "run", stage1_dir / "projector.safetensors", *LORA, "--freeze_mm_mlp_adapter", "True"
    )
    trainer = train(argv)
    return trainer, root / "run", merge(root / "run", root / "merged")


@pytest.fixture(scope="module")
def slice_run(parts, tmp_path_factory):
    """A LoRA run in slice mode (TokenPacker-HD), merged."""
    root = tmp_path_factory.mktemp("slice")
    extra = ("--image_aspect_ratio", "slice", "--patch_num", "9", "--model_max_length", "512")
    trainer = train(stage2_args(parts, root / "run", None, *LORA, *extra))
    return trainer, root / "run", merge(root / "run", root / "merged")


def test_a_frozen_projector_is_merged_as_the_run_ended_with_it(stage1_dir, frozen_projector_run) -> None:
    trainer, run_dir, merged_dir = frozen_projector_run
    peft_model = trainer.model.eval()
    assert not any("modules_to_save" in name for name, _ in peft_model.named_parameters())
    stage1 = load_file(stage1_dir / "projector.safetensors")
    run_projector = load_file(run_dir / "projector.safetensors")
    assert run_projector.keys() == stage1.keys()
    for key, value in run_projector.items():
        assert torch.equal(value, stage1[key]), key  # frozen: stage 1's weights, untouched

    merged = TokenPackerLlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    merged_projector = merged.projector.state_dict()
    assert merged_projector.keys() == run_projector.keys()
    for key, value in run_projector.items():
        assert torch.equal(merged_projector[key], value), key

    # With an image, so the projector takes part: the merged model computes what the run's did.
    image_id = merged.config.image_token_id
    ids = torch.tensor([[1, 5, 6] + [image_id] * merged.num_image_tokens + [7, 8]])
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids, pixel_values=pixels).logits,
            peft_model(input_ids=ids, pixel_values=pixels).logits,
            rtol=1e-4,
            atol=1e-5,
        )


def test_a_slice_mode_run_merges_into_a_slice_mode_model(parts, slice_run) -> None:
    trainer, run_dir, merged_dir = slice_run
    run_config = trainer.model.get_base_model().config
    assert run_config.image_aspect_ratio == "slice" and run_config.patch_num == 9
    assert run_config.slice_separator_ids == list(slice_separator_ids(trainer.processing_class))
    merged_config = json.loads((merged_dir / "config.json").read_text())
    for key in IMAGE_MODE_KEYS:
        assert merged_config[key] == getattr(run_config, key), key

    # The merged folder carries the run's training_config.json: it loads by its template alone.
    loaded = load_model(merged_dir, device="cpu", dtype=torch.float32)
    assert loaded.template.name == json.loads((run_dir / "training_config.json").read_text())["template"]
    assert loaded.image_mode.slicing and loaded.image_mode.patch_num == 9
    assert loaded.image_mode.separator_ids == tuple(run_config.slice_separator_ids)

    # A multi-tile image through the loader: the merged model computes what the run's did.
    visual = loaded.images(parts["images"])("002.png")
    assert visual.plan.num_tiles > 1
    ids = torch.tensor([loaded.prompt_ids([Turn("user", "<image>\nWhat colour?")], [visual])])
    peft_model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids, pixel_values=visual.pixel_values).logits,
            peft_model(input_ids=ids, pixel_values=visual.pixel_values).logits,
            rtol=1e-4,
            atol=1e-5,
        )
