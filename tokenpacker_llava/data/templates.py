"""Conversation templates: turns -> text, plus the character spans the model is trained on.

A template renders a conversation (a list of ``Turn``) to one string and records, for each
assistant answer, the ``[start, end)`` character span to supervise: the answer itself and
its end-of-turn marker (``</s>``, ``<|eot_id|>``, ``<|im_end|>``, ...), never the role
headers or whatever follows the marker (the newline after ``<|im_end|>``). Special tokens are
written literally into the text (``tokenizer.bos_token`` etc.); ``data.tokenize`` then
tokenizes the whole text once and supervises exactly the tokens that end inside a span, so
the label mask is right by construction rather than by counting tokens turn by turn.

``render(..., add_generation_prompt=True)`` renders a conversation that ends with a user
turn up to where the assistant's answer starts: inference uses the same function as
training, so the prompt tokens agree with the training tokens.

Every span starts exactly where the generation prompt for that answer ends. For
``vicuna_v1``, ``llama_2`` and ``mistral`` the prompt ends with ``ASSISTANT:`` / ``[/INST]``
and the span starts at the space before the answer. Usually that space is no token of its
own (SentencePiece ``"▁The"``, byte-level ``"ĠThe"`` carry it and are supervised anyway, as
they end inside the answer), but when the first character does not merge with it (Llama
splits digits, so ``" 2"`` is ``"▁", "2"``; rare characters; small vocabularies) the lone
``"▁"``/``"Ġ"`` is a token the model must generate after the prompt, so it is supervised
too (LLaVA's ``preprocess_v1`` offsets supervise it as well).

A record may start with a system turn; its text replaces the template's default system
message. Every template is registered under one exact name in ``TEMPLATES``:
``plain``, ``vicuna_v1``, ``llama_2``, ``llama_3``, ``mistral``, ``chatml`` and
``tokenizer`` (the tokenizer's own Jinja ``chat_template``).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenpacker_llava.data.records import IMAGE_PLACEHOLDER, Turn
from tokenpacker_llava.registry import Registry


@dataclass
class Rendered:
    """A rendered conversation.

    ``supervised`` holds one ``[start, end)`` character span per assistant answer, in
    order: the answer plus its end-of-turn marker, starting where the generation prompt for
    that answer ends.
    """

    text: str
    supervised: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Dialogue:
    """A conversation split into its parts: optional system text, (question, answer) pairs,
    and, for a generation prompt, the final unanswered question."""

    system: str | None
    pairs: list[tuple[str, str]]
    question: str | None = None


def split_turns(turns: Sequence[Turn], *, add_generation_prompt: bool = False) -> Dialogue:
    """Split ``turns`` into system / pairs / final question; raise ValueError on a bad order.

    Training (``add_generation_prompt=False``) needs ``[system], user, assistant, ...,
    user, assistant``; a generation prompt needs the same but ending with a user turn.
    """
    turns = list(turns)
    system = None
    if turns and turns[0].role == "system":
        system = turns[0].text
        turns = turns[1:]
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(f"turn {index} is {turn.role!r}; turns must alternate user, assistant, ...")
    question = None
    if add_generation_prompt:
        if not turns or turns[-1].role != "user":
            raise ValueError("a generation prompt needs a conversation that ends with a user turn")
        question = turns[-1].text
        turns = turns[:-1]
    elif not turns or turns[-1].role != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    pairs = [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns), 2)]
    return Dialogue(system=system, pairs=pairs, question=question)


class _Builder:
    """Concatenates text pieces and remembers which ones are supervised."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self.supervised: list[tuple[int, int]] = []

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)

    def add_supervised(self, text: str) -> None:
        start = self._length
        self.add(text)
        self.supervised.append((start, self._length))

    def build(self) -> Rendered:
        return Rendered("".join(self._parts), self.supervised)


def _special(tokenizer: Any, attribute: str, template: str) -> str:
    """``tokenizer.<attribute>`` (e.g. ``bos_token``); a ValueError if the tokenizer has none."""
    value = getattr(tokenizer, attribute, None)
    if not value:
        raise ValueError(f"template {template!r} needs the tokenizer's {attribute}, but it has none")
    return str(value)


class ConversationTemplate(ABC):
    """Renders turns to text plus supervised character spans (see the module docstring)."""

    name: str = ""

    @abstractmethod
    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        """Render ``turns``; with ``add_generation_prompt`` up to where the next answer starts."""

    @abstractmethod
    def required_tokens(self, tokenizer: Any) -> list[str]:
        """The special strings this template writes, each of which must be ONE token."""

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ValueError unless every string of ``required_tokens`` is a single token.

        A string counts as one token when it encodes to one id on its own and that id also
        appears when the string sits between ordinary characters (a plain vocabulary entry
        could merge with its neighbours; an added/special token never does). The result is
        cached per tokenizer until its vocabulary size changes.
        """
        size = len(tokenizer)
        if "_checked" not in self.__dict__:
            # Tokenizers already checked -> their vocabulary size at that time.
            self._checked: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        try:
            if self._checked.get(tokenizer) == size:
                return
        except TypeError:  # not weak-referenceable / hashable: check every time
            pass
        unk = getattr(tokenizer, "unk_token_id", None)
        for token in self.required_tokens(tokenizer):
            ids = tokenizer.encode(token, add_special_tokens=False)
            single = len(ids) == 1 and (ids[0] != unk or token == getattr(tokenizer, "unk_token", None))
            if single:
                in_context = tokenizer.encode(f"a{token}a", add_special_tokens=False)
                single = ids[0] in in_context
            if not single:
                raise ValueError(
                    f"template {self.name!r} writes {token!r}, which is not one token of this tokenizer "
                    f"(it encodes to {ids}); add it as a special token (e.g. "
                    f"tokenizer.add_special_tokens({{'extra_special_tokens': [{token!r}]}}, "
                    "replace_extra_special_tokens=False)) or choose the template that matches the model"
                )
        try:
            self._checked[tokenizer] = size
        except TypeError:
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for DataLoader workers; the cache of checked tokenizers is not carried over.
        state = self.__dict__.copy()
        state.pop("_checked", None)
        return state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


TEMPLATES: Registry[ConversationTemplate] = Registry("conversation template")


def _register(cls: type[ConversationTemplate]) -> type[ConversationTemplate]:
    TEMPLATES.add(cls.name, cls())
    return cls


def get_template(name: str, tokenizer: Any = None) -> ConversationTemplate:
    """The template registered as ``name``; checked against ``tokenizer`` when one is given."""
    template = TEMPLATES.get(name)
    if tokenizer is not None:
        template.check_tokenizer(tokenizer)
    return template


LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATML_SYSTEM = "You are a helpful assistant."


@_register
class PlainTemplate(ConversationTemplate):
    """LLaVA-1.5 stage 1 (feature alignment): ``{bos}<image>{caption}\\n`` per pair.

    As in LLaVA's ``preprocess_plain``, the user text is reduced to its ``<image>``
    placeholders (the rest of the human text is discarded) and the system turn is ignored.
    Supervised: ``{answer}\\n``.
    """

    name = "plain"

    def required_tokens(self, tokenizer: Any) -> list[str]:
        return [_special(tokenizer, "bos_token", self.name)]

    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        dialogue = split_turns(turns, add_generation_prompt=add_generation_prompt)
        out = _Builder()
        out.add(_special(tokenizer, "bos_token", self.name))
        for question, answer in dialogue.pairs:
            out.add(IMAGE_PLACEHOLDER * question.count(IMAGE_PLACEHOLDER))
            out.add_supervised(answer + "\n")
        if dialogue.question is not None:
            out.add(IMAGE_PLACEHOLDER * dialogue.question.count(IMAGE_PLACEHOLDER))
        return out.build()


@_register
class VicunaV1Template(ConversationTemplate):
    """LLaVA's ``vicuna_v1``: ``{bos}{sys} USER: {q} ASSISTANT: {a}</s>USER: ...``.

    Supervised: ``{a}</s>``, from where the generation prompt ``... ASSISTANT:`` ends (see
    the module docstring about the separating space).
    """

    name = "vicuna_v1"

    def required_tokens(self, tokenizer: Any) -> list[str]:
        return [_special(tokenizer, "bos_token", self.name), _special(tokenizer, "eos_token", self.name)]

    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        dialogue = split_turns(turns, add_generation_prompt=add_generation_prompt)
        bos = _special(tokenizer, "bos_token", self.name)
        eos = _special(tokenizer, "eos_token", self.name)
        system = VICUNA_SYSTEM if dialogue.system is None else dialogue.system
        out = _Builder()
        out.add(f"{bos}{system} ")
        for question, answer in dialogue.pairs:
            out.add(f"USER: {question} ASSISTANT:")
            out.add_supervised(f" {answer}{eos}")
        if dialogue.question is not None:
            out.add(f"USER: {dialogue.question} ASSISTANT:")
        return out.build()


@_register
class Llama2Template(ConversationTemplate):
    """LLaVA's ``llava_llama_2``:
    ``{bos}[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q1} [/INST] {a1} {eos}{bos}[INST] {q2} [/INST] {a2} {eos}``.

    An empty system message drops the ``<<SYS>>`` block (as LLaVA does). Supervised:
    ``{a} {eos}``, from where the generation prompt ``... [/INST]`` ends.
    """

    name = "llama_2"

    def required_tokens(self, tokenizer: Any) -> list[str]:
        return [_special(tokenizer, "bos_token", self.name), _special(tokenizer, "eos_token", self.name)]

    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        dialogue = split_turns(turns, add_generation_prompt=add_generation_prompt)
        bos = _special(tokenizer, "bos_token", self.name)
        eos = _special(tokenizer, "eos_token", self.name)
        system = LLAMA_2_SYSTEM if dialogue.system is None else dialogue.system
        questions = [question for question, _ in dialogue.pairs]
        if dialogue.question is not None:
            questions.append(dialogue.question)
        if system:
            questions[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{questions[0]}"
        out = _Builder()
        for index, question in enumerate(questions):
            if index < len(dialogue.pairs):
                out.add(f"{bos}[INST] {question} [/INST]")
                out.add_supervised(f" {dialogue.pairs[index][1]} {eos}")
            else:
                out.add(f"{bos}[INST] {question} [/INST]")
        return out.build()


@_register
class Llama3Template(ConversationTemplate):
    """Llama 3 instruct: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n
    {text}<|eot_id|>`` per turn, system first (default: the llama_2 system message).

    Supervised: ``{a}<|eot_id|>``. Generation prompt ends with the assistant header
    (``<|end_header_id|>\\n\\n``).
    """

    name = "llama_3"
    BEGIN, START, END, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

    def required_tokens(self, tokenizer: Any) -> list[str]:
        return [self.BEGIN, self.START, self.END, self.EOT]

    def _header(self, role: str) -> str:
        return f"{self.START}{role}{self.END}\n\n"

    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        dialogue = split_turns(turns, add_generation_prompt=add_generation_prompt)
        system = LLAMA_2_SYSTEM if dialogue.system is None else dialogue.system
        out = _Builder()
        out.add(f"{self.BEGIN}{self._header('system')}{system}{self.EOT}")
        for question, answer in dialogue.pairs:
            out.add(f"{self._header('user')}{question}{self.EOT}{self._header('assistant')}")
            out.add_supervised(answer + self.EOT)
        if dialogue.question is not None:
            out.add(f"{self._header('user')}{dialogue.question}{self.EOT}{self._header('assistant')}")
        return out.build()


@_register
class MistralTemplate(ConversationTemplate):
    """Mistral instruct: ``{bos}[INST] {q1} [/INST] {a1}{eos}[INST] {q2} [/INST] {a2}{eos}``.

    No default system message; a system turn is prepended to the first question with
    ``\\n\\n``. Supervised: ``{a}{eos}``, from where the generation prompt ``... [/INST]`` ends.
    """

    name = "mistral"

    def required_tokens(self, tokenizer: Any) -> list[str]:
        return [_special(tokenizer, "bos_token", self.name), _special(tokenizer, "eos_token", self.name)]

    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        dialogue = split_turns(turns, add_generation_prompt=add_generation_prompt)
        bos = _special(tokenizer, "bos_token", self.name)
        eos = _special(tokenizer, "eos_token", self.name)
        questions = [question for question, _ in dialogue.pairs]
        if dialogue.question is not None:
            questions.append(dialogue.question)
        if dialogue.system:
            questions[0] = f"{dialogue.system}\n\n{questions[0]}"
        out = _Builder()
        out.add(bos)
        for index, question in enumerate(questions):
            if index < len(dialogue.pairs):
                out.add(f"[INST] {question} [/INST]")
                out.add_supervised(f" {dialogue.pairs[index][1]}{eos}")
            else:
                out.add(f"[INST] {question} [/INST]")
        return out.build()


@_register
class ChatMLTemplate(ConversationTemplate):
    """ChatML (Qwen): ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` per turn, system first
    (default "You are a helpful assistant."), no BOS.

    Supervised: ``{a}<|im_end|>`` (not the newline after it). Generation prompt ends with
    ``<|im_start|>assistant\\n``.
    """

    name = "chatml"
    START, END = "<|im_start|>", "<|im_end|>"

    def required_tokens(self, tokenizer: Any) -> list[str]:
        return [self.START, self.END]

    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        dialogue = split_turns(turns, add_generation_prompt=add_generation_prompt)
        system = CHATML_SYSTEM if dialogue.system is None else dialogue.system
        start, end = self.START, self.END
        out = _Builder()
        out.add(f"{start}system\n{system}{end}\n")
        for question, answer in dialogue.pairs:
            out.add(f"{start}user\n{question}{end}\n{start}assistant\n")
            out.add_supervised(answer + end)
            out.add("\n")
        if dialogue.question is not None:
            out.add(f"{start}user\n{dialogue.question}{end}\n{start}assistant\n")
        return out.build()


@_register
class TokenizerChatTemplate(ConversationTemplate):
    """The tokenizer's own Jinja ``chat_template`` (``tokenizer.apply_chat_template``).

    Messages are ``{"role": ..., "content": str}``. Answer ``k``'s span is found by
    rendering prefixes: ``P_k`` = the messages up to the question of answer ``k`` with the
    generation prompt, ``F_k`` = the messages through answer ``k``; the span is
    ``[len(P_k), len(F_k))`` without trailing whitespace. That needs a prefix-stable chat
    template (``P_k`` a prefix of ``F_k``, ``F_k`` of the full text); one that rewrites
    earlier turns (e.g. drops past reasoning) is rejected with a ValueError.
    """

    name = "tokenizer"

    def required_tokens(self, tokenizer: Any) -> list[str]:
        self._chat_template(tokenizer)
        return []

    def _chat_template(self, tokenizer: Any) -> str:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"template {self.name!r} uses the tokenizer's chat_template, but this tokenizer has none; "
                f"choose one of the named templates ({', '.join(n for n in TEMPLATES if n != self.name)})"
            )
        if isinstance(template, dict):  # several named templates: use the default one
            if "default" not in template:
                raise ValueError(
                    f"the tokenizer has several chat templates ({sorted(template)}) and none named 'default'"
                )
            template = template["default"]
        return template

    def _apply(self, tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=self._chat_template(tokenizer),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        if not isinstance(text, str):
            raise ValueError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text

    def render(
        self, turns: Sequence[Turn], tokenizer: Any, *, add_generation_prompt: bool = False
    ) -> Rendered:
        split_turns(turns, add_generation_prompt=add_generation_prompt)  # validates the order
        messages = [{"role": turn.role, "content": turn.text} for turn in turns]
        text = self._apply(tokenizer, messages, add_generation_prompt)
        supervised = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(tokenizer, messages[:index], True)
            through = self._apply(tokenizer, messages[: index + 1], False)
            if not through.startswith(prompt) or not text.startswith(through):
                raise ValueError(
                    "the tokenizer's chat template is not prefix-stable: rendering a conversation prefix "
                    f"(through message {index}) does not give a prefix of the full rendering, so the "
                    "answers' spans cannot be located; use a named template instead"
                )
            start, end = len(prompt), len(through.rstrip())
            if message["content"].strip() not in through[start:end]:
                raise ValueError(
                    f"the tokenizer's chat template does not render assistant message {index} verbatim "
                    "after its generation prompt; use a named template instead"
                )
            supervised.append((start, end))
        return Rendered(text, supervised)
