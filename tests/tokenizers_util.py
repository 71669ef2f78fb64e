"""Locally built tokenizers for the template/tokenization tests (nothing is downloaded).

``train_byte_level_bpe`` trains a GPT-2-style byte-level BPE with the ``tokenizers`` library.
``prepare`` adds what the templates need: ``<image>``, the Llama 3 and ChatML special tokens
and a ChatML Jinja chat template.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenpacker_llava.tokenization import ensure_image_token

LLAMA_3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

# ChatML as Qwen writes it (default system message when the first message is not one).
CHATML_JINJA = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BPE_CORPUS = [
    "the quick brown fox jumps over the lazy dog.\n\n",
    "A picture of a red square and a blue circle in row 3 column 5.\n",
    "USER: what is in the image? ASSISTANT: a small green triangle.\n\n",
    "A chat between a curious user and an artificial intelligence assistant.\n",
    "You are a helpful language and vision assistant. Describe the image briefly.\n\n",
]


def train_byte_level_bpe(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (``Ġ`` for spaces, ``Ċ`` for newlines), bos ``<s>``, eos ``</s>``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(BPE_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def prepare(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add ``<image>``, the Llama 3 / ChatML special tokens and a ChatML chat template; return the image id."""
    image_token_id = ensure_image_token(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": LLAMA_3_TOKENS + CHATML_TOKENS}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = CHATML_JINJA
    return image_token_id
