"""Vision encoders: layer selection, CLS handling, multi-level features and loading."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, tiny_vision_config
from transformers import AutoModel, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from tokenpacker_llava.models.vision import (
    VisionEncoder,
    default_multi_level_layers,
    resolve_layer,
    vision_config_from_pretrained,
)
from tokenpacker_llava.registry import RegistryError


def test_default_multi_level_layers() -> None:
    assert default_multi_level_layers(24) == [12, 16, 22, 23]  # the reference levels of CLIP-L
    assert default_multi_level_layers(12) == [6, 8, 10, 11]
    assert default_multi_level_layers(27) == [14, 18, 25, 26]  # SigLIP-so400m depth
    assert default_multi_level_layers(4) == [2, 3, 2, 3]
    assert all(1 <= i <= n for n in range(1, 40) for i in default_multi_level_layers(n))


def test_resolve_layer() -> None:
    assert resolve_layer(-2, 24) == 23 and resolve_layer(-1, 24) == 24 and resolve_layer(-25, 24) == 0
    with pytest.raises(ValueError, match="out of range for a 24-layer"):
        resolve_layer(25, 24)


@pytest.mark.parametrize(("family", "prefix"), [("clip", 1), ("siglip", 0)])
def test_features_equal_transformers_hidden_states(family: str, prefix: int) -> None:
    torch.manual_seed(0)
    config = tiny_vision_config(family, num_layers=6)
    reference = AutoModel.from_config(config).eval()
    encoder = VisionEncoder(
        config, feature_layer=-2, multi_level_layers=[2, 3, 4, 5], model=AutoModel.from_config(config)
    ).eval()
    encoder.model.load_state_dict(reference.state_dict(), strict=False)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        hidden = reference(pixels, output_hidden_states=True).hidden_states
        out = encoder(pixels)
    grid = (IMAGE_SIZE // config.patch_size) ** 2
    assert encoder.num_prefix_tokens == prefix
    assert out.features.shape == (2, grid, 32)  # CLS dropped for CLIP, nothing for SigLIP
    torch.testing.assert_close(out.features, hidden[5][:, prefix:], rtol=0, atol=1e-6)
    expected_multi = torch.cat([hidden[i][:, prefix:] for i in (2, 3, 4, 5)], dim=-1)
    torch.testing.assert_close(out.multi_level, expected_multi, rtol=0, atol=1e-6)
    # Only the layers up to the deepest selected one exist; the pooling heads are gone.
    assert len(encoder.model.encoder.layers) == 5
    assert not hasattr(encoder.model, "post_layernorm") and not hasattr(encoder.model, "head")


def test_query_layer_only_when_multi_level_not_requested() -> None:
    config = tiny_vision_config("clip", num_layers=4)
    encoder = VisionEncoder(config, feature_layer=-2, multi_level_layers=None)
    assert encoder.multi_level_layers == (2, 3, 2, 3)
    out = encoder(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), with_multi_level=False)
    assert out.multi_level is None and out.features.shape == (1, 144, 32)
    shallow = VisionEncoder(config, feature_layer=0)
    assert len(shallow.model.encoder.layers) == 0
    assert shallow(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)).features.shape == (1, 144, 32)


def test_from_pretrained_folders(tmp_path) -> None:
    torch.manual_seed(0)
    vision = tiny_vision_config("clip", num_layers=4)
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
    )
    full = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text))
    full.save_pretrained(
        tmp_path / "clip_full"
    )  # a full CLIP checkpoint, like openai/clip-vit-large-patch14-336
    siglip = SiglipModel(SiglipConfig(vision_config=tiny_vision_config("siglip").to_dict(), text_config=text))
    siglip.save_pretrained(tmp_path / "siglip_full")

    encoder = VisionEncoder.from_pretrained(str(tmp_path / "clip_full"), multi_level_layers=None)
    assert encoder.config.model_type == "clip_vision_model"
    torch.testing.assert_close(
        encoder.model.embeddings.patch_embedding.weight, full.vision_model.embeddings.patch_embedding.weight
    )
    siglip_encoder = VisionEncoder.from_pretrained(str(tmp_path / "siglip_full"))
    assert siglip_encoder.num_prefix_tokens == 0
    assert vision_config_from_pretrained(str(tmp_path / "siglip_full")).model_type == "siglip_vision_model"


def test_unknown_family_is_a_clear_error(tmp_path) -> None:
    from transformers import ViTConfig

    with pytest.raises(RegistryError, match="unknown vision encoder family 'vit'"):
        VisionEncoder(
            ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
        )
