"""Choosing the attention backend: FlashAttention-2 when installed on CUDA, SDPA otherwise."""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str | None = "auto") -> str:
    """Map a user choice to a transformers ``attn_implementation``.

    ``auto`` (or None) picks ``flash_attention_2`` when flash-attn is installed and a CUDA
    device is present, else ``sdpa``. Asking for ``flash_attention_2`` explicitly without it
    is an error rather than a silent downgrade.
    """
    choice = requested or "auto"
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention implementation {choice!r}; choose from {ATTENTION_CHOICES}")
    if choice == "auto":
        choice = "flash_attention_2" if flash_attention_available() else "sdpa"
        logger.info("attention implementation: %s", choice)
    elif choice == "flash_attention_2" and not flash_attention_available():
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA device "
            "(pip install 'tokenpacker-llava[flash]'); use 'auto' or 'sdpa' to run without it"
        )
    return choice
