"""Attention backends: which one a run uses, and ``sdpa_varlen``, SDPA that skips cross-sample work.

A packed row (several samples in one row, positions restarting at 0; see
``data.collate.PackedCollator``) needs a block-diagonal causal mask. FlashAttention-2 handles it
with its varlen kernel. Plain ``sdpa`` gets the mask as a dense (T, T) tensor, so every row costs
attention over the whole row (T**2 instead of the sum of the samples' L**2) and never reaches a
fused kernel. ``sdpa_varlen`` runs one causal SDPA call per sample instead, and is plain ``sdpa``
everywhere else (padded batches, generation, the vision tower). It is registered with
transformers' ``AttentionInterface``, the library's extension point for attention functions, so
any model that supports attention backends can load with ``attn_implementation="sdpa_varlen"``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger(__name__)

SDPA_VARLEN = "sdpa_varlen"
ATTENTION_CHOICES = ("auto", "flash_attention_2", SDPA_VARLEN, "sdpa", "eager")


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str | None = "auto") -> str:
    """Map a user choice to a transformers ``attn_implementation``.

    ``auto`` (or None) picks ``flash_attention_2`` when flash-attn is installed and a CUDA
    device is present, else ``sdpa_varlen``. Asking for ``flash_attention_2`` explicitly without
    it is an error rather than a silent downgrade.
    """
    choice = requested or "auto"
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention implementation {choice!r}; choose from {ATTENTION_CHOICES}")
    if choice == "auto":
        choice = "flash_attention_2" if flash_attention_available() else SDPA_VARLEN
        logger.info("attention implementation: %s", choice)
    elif choice == "flash_attention_2" and not flash_attention_available():
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA device "
            "(pip install 'tokenpacker-llava[flash]'); use 'auto' or 'sdpa' to run without it"
        )
    return choice


def packed_lengths(
    length: int, position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None
) -> list[int] | None:
    """The sample lengths of one packed row of ``length`` tokens, or None if it holds one sample.

    Read from ``cu_seq_lens`` (FlashAttention's boundaries) when given, else from where the
    ``position_ids`` of a single row restart at 0.
    """
    if cu_seq_lens is not None:
        bounds = cu_seq_lens.tolist()
    elif position_ids is not None and position_ids.shape[0] == 1:
        bounds = [*(position_ids[0] == 0).nonzero().flatten().tolist(), length]
        if bounds[0] != 0:  # a continuation (e.g. after a cache), not a packed row
            return None
    else:
        return None
    lengths = [end - start for start, end in zip(bounds, bounds[1:], strict=False)]
    if sum(lengths) != length or min(lengths, default=0) < 1:
        raise ValueError(f"packed sample boundaries {bounds} do not split a row of {length} tokens")
    return lengths if len(lengths) > 1 else None


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Per-sample causal SDPA on a packed row; ``sdpa_attention_forward`` otherwise.

    ``query`` is (1, heads, T, D), ``key``/``value`` (1, kv_heads, T, D); returns (1, T, heads, D)
    like every transformers attention function.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    lengths = None
    # Only the self-attention of a full row qualifies: no cache offset, no sliding window (its
    # mask would be dropped here; Qwen2 keeps the window on the module, Mistral passes it as an
    # argument), causal, one row.
    if (
        causal
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and getattr(module, "sliding_window", None) is None
        and kwargs.get("sliding_window") is None
    ):
        lengths = packed_lengths(query.shape[2], kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
    if lengths is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    pieces = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )
        for q, k, v in zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
        )
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


# The mask is built as for sdpa, so every path that falls back gets exactly what sdpa gets.
AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention_forward)
AttentionMaskInterface.register(SDPA_VARLEN, sdpa_mask)
