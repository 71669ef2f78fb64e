"""The reference-checkpoint converter, on a tiny folder written in the LLaVA/TokenPacker layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, multimodal_batch, tiny_text_config, tiny_vision_config
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.cli import main
from tokenpacker_llava.conversion.reference import ConversionError, convert_reference_checkpoint
from tokenpacker_llava.models.vision import VisionEncoder

VOCAB = 400  # the SentencePiece tokenizer's size; <image> becomes id 400


def write_clip(folder: Path) -> Path:
    torch.manual_seed(1)
    vision = tiny_vision_config("clip", num_layers=4).to_dict()
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
    )
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


def write_reference_folder(
    folder: Path,
    model: TokenPackerLlavaForConditionalGeneration,
    clip_dir: Path,
    tokenizer_dir: Path,
    **config_changes,
) -> None:
    """Write `model`'s weights the way LlavaLlamaForCausalLM saves them (two .bin shards);
    `config_changes` update config.json (a None value removes the key)."""
    folder.mkdir()
    text = model.config.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    config = {
        **text,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "torch_dtype": "float32",
        "mm_vision_tower": str(clip_dir),
        "mm_projector_type": model.config.projector_type,
        "mm_hidden_size": 32,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_projector_lr": None,
        "scale_factor": model.config.scale_factor,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    config.update(config_changes)
    config = {key: value for key, value in config.items() if value is not None or key not in config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    prefix = type(model.projector).reference_key_prefix
    projector = {f"model.mm_projector.{k[len(prefix) :]}": v for k, v in model.projector.state_dict().items()}
    llm = {k.removeprefix("language_model."): v for k, v in model.language_model.state_dict().items()}
    shards = {"pytorch_model-00001-of-00002.bin": projector, "pytorch_model-00002-of-00002.bin": llm}
    weight_map = {}
    for name, shard in shards.items():
        torch.save({k: v.clone() for k, v in shard.items()}, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())


def reference_model(
    clip_dir: Path, projector: str, scale_factor: int | None = None
) -> TokenPackerLlavaForConditionalGeneration:
    config = TokenPackerLlavaConfig(
        vision_config=tiny_vision_config("clip", num_layers=4),
        text_config=tiny_text_config("llama", vocab_size=VOCAB),
        projector_type=projector,
        scale_factor=scale_factor,
        image_token_id=VOCAB,
    )
    torch.manual_seed(0)
    model = TokenPackerLlavaForConditionalGeneration(config)
    # The same tower weights the converter will load from mm_vision_tower.
    model.vision_tower = VisionEncoder.from_pretrained(
        str(clip_dir), multi_level_layers=config.resolved_multi_level_layers
    )
    return model.eval()


def image_batch(model: TokenPackerLlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    batch = multimodal_batch(model)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == 300, VOCAB)
    return batch


@pytest.mark.parametrize("projector", ["tokenpacker", "mlp2x_gelu"])
def test_converted_reference_folder_gives_the_same_logits(
    tmp_path, llama_tokenizer_dir, projector: str
) -> None:
    clip_dir = write_clip(tmp_path / "clip")
    direct = reference_model(clip_dir, projector, scale_factor=2 if projector == "tokenpacker" else None)
    config = direct.config
    src = tmp_path / "reference"
    write_reference_folder(src, direct, clip_dir, llama_tokenizer_dir)

    dst = tmp_path / "converted"
    assert main(["convert", "--src", str(src), "--dst", str(dst)]) == 0

    converted = TokenPackerLlavaForConditionalGeneration.from_pretrained(dst).eval()
    assert converted.config.projector_type == projector
    assert converted.config.image_token_id == VOCAB
    assert converted.config.resolved_multi_level_layers == config.resolved_multi_level_layers
    batch = image_batch(direct)
    with torch.no_grad():
        torch.testing.assert_close(converted(**batch).logits, direct(**batch).logits, rtol=0, atol=0)

    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.convert_tokens_to_ids("<image>") == VOCAB
    assert tokenizer.pad_token == tokenizer.unk_token
    assert tokenizer("a <image> b").input_ids.count(VOCAB) == 1
    assert AutoImageProcessor.from_pretrained(dst).crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert list(dst.glob("*.safetensors")) and not list(dst.glob("*.bin"))

    half = tmp_path / "converted_bf16"
    assert main(["convert", "--src", str(src), "--dst", str(half), "--dtype", "bfloat16", "--no_verify"]) == 0
    from safetensors.torch import load_file

    weights = load_file(next(half.glob("*.safetensors")))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    assert any(k.startswith("vision_tower.") for k in weights) and any(
        k.startswith("projector.") for k in weights
    )


def test_the_projector_is_read_from_the_weights_not_from_mm_projector_type(
    tmp_path, llama_tokenizer_dir, caplog
) -> None:
    """The reference builds TokenPacker whatever mm_projector_type says, and its scripts pass
    mlp2x_gelu: such a checkpoint (here also without scale_factor) converts as TokenPacker."""
    clip_dir = write_clip(tmp_path / "clip")
    direct = reference_model(clip_dir, "tokenpacker", scale_factor=3)
    src = tmp_path / "reference"
    write_reference_folder(
        src, direct, clip_dir, llama_tokenizer_dir, mm_projector_type="mlp2x_gelu", scale_factor=None
    )
    assert "scale_factor" not in json.loads((src / "config.json").read_text())

    default = tmp_path / "default_scale"
    with caplog.at_level("WARNING", logger="tokenpacker_llava.conversion.reference"):
        assert main(["convert", "--src", str(src), "--dst", str(default)]) == 0  # verified: loads strictly
    assert "mm_projector_type='mlp2x_gelu', but the mm_projector weights are 'tokenpacker'" in caplog.text
    assert "no scale_factor: assuming tokenpacker's default 2 (36 visual tokens)" in caplog.text
    assert "--scale_factor" in caplog.text
    converted = TokenPackerLlavaForConditionalGeneration.from_pretrained(default)
    assert converted.config.projector_type == "tokenpacker" and converted.config.scale_factor == 2

    # The scale cannot be read from the weights: --scale_factor gives the trained one back.
    dst = tmp_path / "converted"
    caplog.clear()
    with caplog.at_level("WARNING", logger="tokenpacker_llava.conversion.reference"):
        assert main(["convert", "--src", str(src), "--dst", str(dst), "--scale_factor", "3"]) == 0
    assert "scale_factor" not in caplog.text
    converted = TokenPackerLlavaForConditionalGeneration.from_pretrained(dst).eval()
    assert converted.config.projector_type == "tokenpacker" and converted.config.scale_factor == 3
    batch = image_batch(direct)
    with torch.no_grad():
        torch.testing.assert_close(converted(**batch).logits, direct(**batch).logits, rtol=0, atol=0)

    # --projector_type wins over the weights (here wrongly, so the strict check fails).
    caplog.clear()
    with pytest.raises(ConversionError, match="projector.layers.0.weight"):
        convert_reference_checkpoint(src, tmp_path / "forced", projector_type="mlp2x_gelu")
    assert "projector_type='mlp2x_gelu' overrides the checkpoint" in caplog.text
    with pytest.raises(ConversionError, match="a 12x12 patch grid cannot be packed with scale_factor 5"):
        convert_reference_checkpoint(src, tmp_path / "bad_scale", scale_factor=5, verify=False)


def test_not_a_reference_folder(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="no mm_\\* keys"):
        convert_reference_checkpoint(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_code_in_bin_files_is_refused(tmp_path, zip_format: bool) -> None:
    clip_dir = write_clip(tmp_path / "clip")
    src = tmp_path / "evil"
    src.mkdir()
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_projector_type": "linear",
        "mm_vision_tower": str(clip_dir),
    }
    (src / "config.json").write_text(json.dumps(config))
    payload = {"model.embed_tokens.weight": Exploit()}
    if zip_format:
        torch.save(payload, src / "pytorch_model.bin")
    else:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        convert_reference_checkpoint(src, tmp_path / "out")


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))
