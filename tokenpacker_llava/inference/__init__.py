"""Inference on trained models: loading a model folder, chat, and batch answering of question files.

* ``loading.load_model(path)`` -> ``LoadedModel`` (model, left-padding tokenizer, image processor,
  the conversation template the model was trained with, tokens per image).
* ``generation.generate(...)``: batched, left-padded generation of prompts built exactly as
  training tokenized them.
* ``chat``: ``tokenpacker-llava chat`` (single-shot ``--prompt`` or an interactive loop).
* ``answer``: LLaVA-format question files -> resumable, shardable answer files.
* ``commands``: the ``chat`` / ``answer`` / ``merge-answers`` / ``eval`` / ``score`` subcommands.

Submodules import torch and transformers; this package file imports nothing, so the command
line stays fast.
"""
