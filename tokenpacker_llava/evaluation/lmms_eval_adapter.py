"""The model as an `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ model.

``TokenPackerLlavaLmms`` implements lmms-eval's (simple) model interface without importing
lmms-eval: requests are objects whose ``.args`` are, as for lmms-eval's ``Instance``,

* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``;
* ``loglikelihood``: ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``;

and ``doc_to_visual(self.task_dict[task][split][doc_id])`` gives the document's PIL images
(lmms-eval's evaluator sets ``task_dict``). Images are placed before the context as
``<image>\\n`` (unless the context already holds one ``<image>`` per image) and the prompt is
built with the model's training template. ``register_with_lmms_eval()`` makes the class an
``lmms_eval.api.model.lmms`` subclass and registers it, after which

    python -m lmms_eval --model tokenpacker_llava --model_args pretrained=PATH --tasks mme ...

works in a script that called it first (lmms-eval must be installed for that).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from tokenpacker_llava.data.records import IMAGE_PLACEHOLDER, Turn
from tokenpacker_llava.data.tokenize import _encode
from tokenpacker_llava.data.visual_inputs import VisualInput
from tokenpacker_llava.inference.generation import GenerationSettings, generate
from tokenpacker_llava.inference.loading import LoadedModel, load_model
from tokenpacker_llava.tokenization import expand_images

logger = logging.getLogger(__name__)

LMMS_EVAL_NAME = "tokenpacker_llava"


class TokenPackerLlavaLmms:
    """lmms-eval's model interface over a model folder (see the module docstring).

    Keyword arguments arrive as strings from lmms-eval's ``--model_args`` and are converted.
    ``loaded`` reuses an already loaded model instead of ``pretrained``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        template: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 128,
        loaded: LoadedModel | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()  # lmms.__init__ when registered with lmms-eval; object's otherwise
        if loaded is None:
            if pretrained is None:
                raise ValueError("pass pretrained=<model folder>")
            loaded = load_model(pretrained, template=template, device=device, dtype=dtype)
        if unused:
            logger.warning("ignoring model arguments %s", sorted(unused))
        self.loaded = loaded
        self.model_id = loaded.model_id
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict: dict[str, Any] = getattr(self, "task_dict", None) or {}
        self.images = loaded.images()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # -- helpers ---------------------------------------------------------------------------------

    def _images(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[VisualInput]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        from PIL import Image

        prepared = []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise TypeError(f"only PIL images are supported as visuals, got {type(visual).__name__}")
            prepared.append(self.images.from_image(visual))
        return prepared

    @staticmethod
    def _user_text(context: str, num_images: int) -> str:
        placed = context.count(IMAGE_PLACEHOLDER)
        if placed == num_images:
            return context
        if placed:
            raise ValueError(
                f"the context holds {placed} {IMAGE_PLACEHOLDER} placeholders for {num_images} image(s)"
            )
        return "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(num_images)) + context

    def _settings(self, gen_kwargs: dict[str, Any]) -> GenerationSettings:
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        top_p = gen_kwargs.get("top_p")
        return GenerationSettings(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            temperature=temperature,
            top_p=float(top_p) if top_p is not None and temperature > 0 else None,
            num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
        )

    # -- the lmms interface ----------------------------------------------------------------------

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers in request order; requests sharing generation settings are batched."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            gen_kwargs = request.args[1] or {}
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(index)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            settings = self._settings(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts, images = [], []
                for index in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    row_images = self._images(doc_to_visual, doc_id, task, split)
                    prompts.append(
                        self.loaded.prompt_ids(
                            [Turn("user", self._user_text(context, len(row_images)))], row_images
                        )
                    )
                    images.append([image.pixel_values for image in row_images])
                for index, text in zip(chunk, generate(self.loaded, prompts, images, settings), strict=True):
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[index] = text
                    cache_hook = getattr(self, "cache_hook", None)
                    if cache_hook is not None:
                        cache_hook.add_partial("generate_until", (requests[index].args[0], gen_kwargs), text)
        return [text if text is not None else "" for text in results]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(sum of the continuation tokens' log-probabilities, whether greedy decoding picks them all).

        The continuation is scored as the assistant's answer to the context, on exactly the tokens
        training supervises for that answer (without the end-of-turn marker).
        """
        out = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id] if task in self.task_dict else None
            continuation = target if isinstance(target, str) else target(doc)
            images = self._images(doc_to_visual, doc_id, task, split)
            out.append(self.continuation_logprob(self._user_text(context, len(images)), continuation, images))
        return out

    def continuation_logprob(
        self, user_text: str, continuation: str, images: Sequence[VisualInput] = ()
    ) -> tuple[float, bool]:
        loaded = self.loaded
        turns = [Turn("user", user_text), Turn("assistant", continuation)]
        rendered = loaded.template.render(turns, loaded.tokenizer)
        start = rendered.supervised[-1][0]
        position = rendered.text.find(continuation, start)
        if position < 0:
            raise ValueError(f"template {loaded.template_name!r} does not render the continuation verbatim")
        end = position + len(continuation)
        ids, offsets = _encode(rendered.text[:end], loaded.tokenizer)
        # As in training: a token belongs to the answer iff its offset end lies in (start, end].
        first = next((i for i, (_, stop) in enumerate(offsets) if stop > start), len(ids))
        context_ids = expand_images(ids[:first], loaded.image_token_id, [image.token_ids for image in images])
        answer_ids = ids[first:]
        if not answer_ids:
            return 0.0, True
        input_ids = torch.tensor([context_ids + answer_ids], device=loaded.device)
        model = loaded.model
        pixels = None
        if images:
            pixels = torch.cat([image.pixel_values for image in images])
            pixels = pixels.to(loaded.device, next(model.parameters()).dtype)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, pixel_values=pixels).logits[0].float()
        predicted = logits[len(context_ids) - 1 : -1]
        targets = input_ids[0, len(context_ids) :]
        logprobs = torch.log_softmax(predicted, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        greedy = bool((predicted.argmax(dim=-1) == targets).all())
        return float(logprobs.sum()), greedy

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the TokenPacker-LLaVA adapter")


def register_with_lmms_eval(name: str = LMMS_EVAL_NAME) -> type:
    """Register the adapter with lmms-eval as ``name``; returns the registered ``lmms`` subclass.

    Raises ImportError (saying how to install it) when lmms-eval is not installed.
    """
    try:
        from lmms_eval.api.model import lmms
        from lmms_eval.api.registry import register_model
    except ImportError as error:
        raise ImportError(
            "register_with_lmms_eval() needs lmms-eval, which is not installed: "
            "pip install lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval)"
        ) from error
    cls = type("TokenPackerLlava", (TokenPackerLlavaLmms, lmms), {"__module__": __name__})
    register_model(name)(cls)
    return cls
