"""Attention backends: choosing one, and ``sdpa_varlen`` against plain SDPA with the block mask.

The model-level checks (packed == padded logits, losses and gradients; no attention across the
samples of a packed row) run for every backend in test_data_collate.py; here the function itself
is checked on random tensors, including grouped-query heads and the fallbacks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tokenpacker_llava.models.attention import (
    flash_attention_available,
    packed_lengths,
    resolve_attn_implementation,
    sdpa_varlen_attention_forward,
)

LENGTHS = [5, 1, 7, 3]


class SelfAttention(nn.Module):
    """What the attention functions read from a transformers attention module."""

    def __init__(self, *, groups: int = 2, causal: bool = True) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = causal


def qkv(lengths: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, generator=generator)
    k = torch.randn(1, kv_heads, total, dim, generator=generator)
    v = torch.randn(1, kv_heads, total, dim, generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return q, k, v, position_ids


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(sum(lengths))
    allowed = (sample[:, None] == sample[None, :]) & (position[:, None] >= position[None, :])
    return allowed[None, None]


def eager_reference(q, k, v, lengths: list[int], groups: int) -> torch.Tensor:
    """Softmax attention written out, one sample at a time: (1, T, heads, D)."""
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    outputs = []
    for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True):
        scores = qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5
        n = qs.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(scores.softmax(-1) @ vs)
    return torch.cat(outputs, dim=2).transpose(1, 2)


def test_auto_resolution_without_flash_attn() -> None:
    if flash_attention_available():
        pytest.skip("flash-attn is installed on a CUDA machine here")
    assert resolve_attn_implementation("auto") == "sdpa_varlen"
    assert resolve_attn_implementation(None) == "sdpa_varlen"
    for explicit in ("sdpa", "sdpa_varlen", "eager"):
        assert resolve_attn_implementation(explicit) == explicit
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        resolve_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_attn_implementation("flash")


def test_packed_lengths() -> None:
    _, _, _, position_ids = qkv(LENGTHS)
    total = sum(LENGTHS)
    assert packed_lengths(total, position_ids, None) == LENGTHS
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    assert packed_lengths(total, None, cu) == LENGTHS
    assert packed_lengths(total, position_ids, cu) == LENGTHS
    assert packed_lengths(7, torch.arange(7)[None], None) is None  # one sample
    assert packed_lengths(4, torch.arange(3, 7)[None], None) is None  # a continuation
    assert packed_lengths(7, torch.arange(7)[None].repeat(2, 1), None) is None  # a padded batch
    assert packed_lengths(7, None, None) is None
    with pytest.raises(ValueError, match="do not split a row of 17 tokens"):
        packed_lengths(17, None, cu)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_varlen_equals_block_masked_sdpa_and_eager(groups, via) -> None:
    q, k, v, position_ids = qkv(LENGTHS, kv_heads=4 // groups)
    module = SelfAttention(groups=groups)
    if via == "position_ids":
        kwargs = {"position_ids": position_ids}
    else:
        cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 7, "max_length_k": 7}
    # The dense mask is what transformers hands every backend; sdpa_varlen does not need it.
    mask = block_causal_mask(LENGTHS)
    out, weights = sdpa_varlen_attention_forward(module, q, k, v, mask, **kwargs)
    assert weights is None and out.shape == (1, sum(LENGTHS), 4, 8) and out.is_contiguous()
    masked, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
    torch.testing.assert_close(out, masked, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, eager_reference(q, k, v, LENGTHS, groups), atol=1e-6, rtol=0)


def test_varlen_gradients_equal_block_masked_sdpa() -> None:
    module = SelfAttention()
    grads = []
    for forward in (sdpa_varlen_attention_forward, sdpa_attention_forward):
        q, k, v, position_ids = (t.requires_grad_(t.is_floating_point()) for t in qkv(LENGTHS))
        out, _ = forward(module, q, k, v, block_causal_mask(LENGTHS), position_ids=position_ids)
        out.square().sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_everything_else_is_plain_sdpa() -> None:
    q, k, v, position_ids = qkv(LENGTHS)
    # Bidirectional modules (the vision tower) attend across the whole row.
    encoder = SelfAttention(causal=False)
    out, _ = sdpa_varlen_attention_forward(encoder, q, k, v, None, position_ids=position_ids)
    reference, _ = sdpa_attention_forward(encoder, q, k, v, None, position_ids=position_ids)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    # Decoding: one query against a cache.
    decoder = SelfAttention()
    out, _ = sdpa_varlen_attention_forward(
        decoder, q[:, :, -1:], k, v, None, position_ids=position_ids[:, -1:]
    )
    reference, _ = sdpa_attention_forward(
        decoder, q[:, :, -1:], k, v, None, position_ids=position_ids[:, -1:]
    )
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    # A padded batch of two rows with its padding mask.
    q2, k2, v2 = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False
    mask[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # padded queries see themselves
    out, _ = sdpa_varlen_attention_forward(
        decoder, q2, k2, v2, mask, position_ids=torch.arange(16).repeat(2, 1)
    )
    reference, _ = sdpa_attention_forward(decoder, q2, k2, v2, mask)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_sliding_window_models_keep_their_window_on_packed_rows(model_type: str) -> None:
    # Mistral passes its window to the attention function, Qwen2 keeps it on the module: either
    # way a packed row must not lose it (samples longer than the window here).
    extra = {"use_sliding_window": True, "max_window_layers": 0} if model_type == "qwen2" else {}
    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        sliding_window=3,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, 300, (1, 16))
    lengths = (5, 9, 2)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        alone = torch.cat(
            [model(input_ids=part, use_cache=False).logits for part in ids.split(lengths, dim=1)], dim=1
        )
        model.set_attn_implementation("sdpa_varlen")
        packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_in_bf16_on_cuda_equals_block_masked_sdpa() -> None:
    module = SelfAttention()
    q, k, v, position_ids = (t.cuda() for t in qkv(LENGTHS, dim=64))
    q, k, v = (t.bfloat16() for t in (q, k, v))
    mask = block_causal_mask(LENGTHS).cuda()
    out, _ = sdpa_varlen_attention_forward(module, q, k, v, mask, position_ids=position_ids)
    reference, _ = sdpa_attention_forward(module, q, k, v, mask, position_ids=position_ids)
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2, rtol=0)
