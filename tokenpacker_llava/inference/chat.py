"""Chat with a model about an image: one question (``--prompt``) or an interactive conversation.

The image, if any, is attached to the first user turn as ``<image>\\n{text}``, the way the
training data does; later turns are text only and the whole history is re-rendered with the
model's template at every turn (so the prompt is always tokenized exactly as in training).
Interactive mode streams the answer token by token and understands ``/reset`` (forget the
conversation, keep the image) and ``/exit``; end of input (Ctrl-D) also exits.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tokenpacker_llava.data.records import IMAGE_PLACEHOLDER, Turn
from tokenpacker_llava.inference.generation import GenerationSettings, PromptTooLong, generate
from tokenpacker_llava.inference.loading import LoadedModel

COMMANDS = {"/reset": "start a new conversation about the same image", "/exit": "quit"}


class ChatSession:
    """A conversation with ``loaded`` about one image (or none)."""

    def __init__(
        self, loaded: LoadedModel, image: str | None = None, settings: GenerationSettings | None = None
    ) -> None:
        self.loaded = loaded
        self.image = image
        self.settings = settings or GenerationSettings(max_new_tokens=512)
        # Decoded once; BadSample for a missing or corrupt file.
        self.visual = loaded.images()(image) if image is not None else None
        self.history: list[Turn] = []

    @property
    def pixel_values(self):
        """The image's views, ``(views, 3, H, W)``, or None."""
        return self.visual.pixel_values if self.visual is not None else None

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, *, streamer: Any = None) -> str:
        """The model's answer to ``text`` after the conversation so far; both join the history."""
        if not self.history and self.visual is not None:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        user = Turn("user", text)
        # The image sits in the first user turn, which every prompt of the conversation holds.
        images = [self.visual] if self.visual is not None else []
        prompt = self.loaded.prompt_ids([*self.history, user], images)
        answer = generate(self.loaded, [prompt], [self.pixel_values], self.settings, streamer=streamer)[0]
        self.history += [user, Turn("assistant", answer)]
        return answer


def _streamer(tokenizer: Any, out: TextIO) -> Any:
    """A ``transformers.TextStreamer`` writing the answer (not the prompt) to ``out``."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def interactive(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Read questions line by line from ``stdin`` (default ``sys.stdin``) and stream the answers."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    about = f" about {session.image}" if session.image else ""
    commands = ", ".join(f"{name} ({what})" for name, what in COMMANDS.items())
    print(
        f"Chatting with {session.loaded.model_id}{about}. Commands: {commands}; end of input quits.",
        file=stdout,
    )
    while True:
        stdout.write("USER: ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=stdout)
            continue
        if text.startswith("/") and " " not in text:
            print(f"(unknown command {text}; commands: {', '.join(COMMANDS)})", file=stdout)
            continue
        stdout.write("ASSISTANT: ")
        stdout.flush()
        streamer = _streamer(session.loaded.tokenizer, stdout)
        try:
            session.ask(text, streamer=streamer)
        except PromptTooLong as error:
            print(f"\n({error}; /reset to start over)", file=stdout)


def run_chat(
    loaded: LoadedModel,
    *,
    image: str | None,
    prompt: str | None = None,
    settings: GenerationSettings | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """``tokenpacker-llava chat``: print the answer to ``prompt``, or chat interactively without one."""
    session = ChatSession(loaded, image, settings)
    if prompt is not None:
        print(session.ask(prompt), file=stdout if stdout is not None else sys.stdout)
        return 0
    return interactive(session, stdin, stdout)
