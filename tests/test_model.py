"""The composed model on tiny CLIP/SigLIP x Llama/Mistral/Qwen2 configs."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, IMAGE_TOKEN_ID, multimodal_batch, tiny_config, tiny_model
from transformers import AutoModelForImageTextToText

from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration

COMBINATIONS = [
    ("clip", "llama", "tokenpacker"),
    ("siglip", "llama", "tokenpacker"),
    ("clip", "mistral", "tokenpacker"),
    ("clip", "qwen2", "tokenpacker"),
    ("siglip", "qwen2", "mlp2x_gelu"),
    ("clip", "llama", "linear"),
]


def labels_for(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    return ids.masked_fill((ids == IMAGE_TOKEN_ID) | (batch["attention_mask"] == 0), -100)


@pytest.mark.parametrize(("vision", "text", "projector"), COMBINATIONS)
def test_loss_is_finite_and_reaches_the_projector(vision: str, text: str, projector: str) -> None:
    model = tiny_model(vision=vision, text=text, projector=projector).train()
    batch = multimodal_batch(model)
    out = model(**batch, labels=labels_for(batch))
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (*batch["input_ids"].shape, 300)
    out.loss.backward()
    for name, param in model.projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_image_token_counts() -> None:
    assert tiny_config(scale_factor=2).num_image_tokens == 36  # 12x12 grid
    assert tiny_config(scale_factor=3).num_image_tokens == 16
    assert tiny_config(scale_factor=4).num_image_tokens == 9
    assert tiny_config(projector="mlp2x_gelu").num_image_tokens == 144
    assert TokenPackerLlavaConfig().num_image_tokens == 144  # CLIP-L/336, s=2
    assert TokenPackerLlavaConfig(scale_factor=3).num_image_tokens == 64
    assert TokenPackerLlavaConfig(scale_factor=4).num_image_tokens == 36


def test_placeholder_feature_mismatch_raises() -> None:
    model = tiny_model()
    batch = multimodal_batch(model)
    too_few = batch["input_ids"].clone()
    too_few[0, -1] = IMAGE_TOKEN_ID  # one placeholder too many
    with pytest.raises(
        ValueError, match="image placeholder/feature mismatch: input_ids contain 73 image tokens"
    ):
        model(input_ids=too_few, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="2 image\\(s\\) x 36 tokens"):
        model(input_ids=batch["input_ids"][:1], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])


def test_text_only_batch_needs_no_images() -> None:
    model = tiny_model()
    ids = torch.randint(3, 300, (2, 7))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_invalid_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by 5"):
        tiny_config(scale_factor=5)
    with pytest.raises(KeyError, match="unknown projector 'token_packer'"):
        tiny_config(projector="token_packer")
    with pytest.raises(ValueError, match="out of range"):
        tiny_config(vision_feature_layer=9)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        tiny_config(image_aspect_ratio="square")


@pytest.mark.parametrize(("vision", "text", "projector"), [COMBINATIONS[0], COMBINATIONS[3], COMBINATIONS[4]])
def test_save_and_load_give_identical_logits(tmp_path, vision: str, text: str, projector: str) -> None:
    overrides = {"tie_word_embeddings": True} if text == "qwen2" else {}
    model = tiny_model(vision=vision, text=text, projector=projector, text_overrides=overrides)
    batch = multimodal_batch(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded, info = TokenPackerLlavaForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(auto, TokenPackerLlavaForConditionalGeneration)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(auto.eval()(**batch).logits, expected, rtol=0, atol=0)
    if overrides:
        lm = loaded.language_model
        assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()


def greedy_without_cache(model, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Reference decode: full forward over the whole sequence at every step, no KV cache."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids,
            pixel_values=batch["pixel_values"],
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
        ).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids


@pytest.mark.parametrize(("vision", "text", "projector"), [COMBINATIONS[0], COMBINATIONS[2], COMBINATIONS[4]])
def test_generate_with_cache_equals_stepwise_decode(vision: str, text: str, projector: str) -> None:
    model = tiny_model(vision=vision, text=text, projector=projector)
    model.generation_config.eos_token_id = None  # run all steps
    batch = multimodal_batch(model, lengths=((5, 3), (1, 1), (2, 6)))  # left padding in rows 2 and 3
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
        expected = greedy_without_cache(model, batch, steps=8)
    assert torch.equal(generated, expected)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = tiny_model().train()
    batch = multimodal_batch(model)
    labels = labels_for(batch)

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.language_model.model.layers[0].gradient_checkpointing
    assert model.vision_tower.model.encoder.layers[0].gradient_checkpointing
    loss_ckpt, grads_ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_forward_and_backward() -> None:
    model = tiny_model().to(torch.bfloat16).train()
    batch = multimodal_batch(model)
    out = model(**batch, labels=labels_for(batch))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projector.mlp[2].weight.grad.dtype == torch.bfloat16


def test_attention_implementations(tmp_path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    batch = multimodal_batch(model)
    sdpa = TokenPackerLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert sdpa.config._attn_implementation == "sdpa"  # the default
    assert sdpa.language_model.config._attn_implementation == "sdpa"
    assert sdpa.vision_tower.model.config._attn_implementation == "sdpa"
    eager = TokenPackerLlavaForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert eager.language_model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch).logits, eager(**batch).logits, rtol=1e-4, atol=1e-5)


def test_pixel_values_are_cast_to_the_tower_dtype() -> None:
    model = tiny_model()
    model.vision_tower.to(torch.bfloat16)
    batch = multimodal_batch(model)
    out = model(**batch)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert batch["pixel_values"].shape[-1] == IMAGE_SIZE
