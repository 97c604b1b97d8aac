"""Chat prompts: the model's own chat template, rendered by llama.cpp, or a plain fallback.

One function renders a conversation for both ``smoe-gguf chat`` and ``smoe-gguf run --chat``, so
the two prefill the very same tokens.

llama.cpp does not run Jinja: ``llama_chat_apply_template`` recognises the common template
families (ChatML, Llama 2/3, Mistral, Gemma, Phi, DeepSeek, ...) from the GGUF's
``tokenizer.chat_template`` text and renders them itself. A model without a template, or with one
llama.cpp does not recognise, gets the plain fallback format::

    SYSTEM TEXT                 (only when there is a system message)

    User: first message
    Assistant: first reply
    User: second message
    Assistant:

A reply in the fallback format ends where the model starts a line ``User:`` itself (or at an
end-of-generation token, or after ``-n`` tokens).
"""

from __future__ import annotations

import codecs
import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp

# Prompts of chat turns are prefilled in micro-batches of this many tokens (fewer when the budget
# shrinks the engine's micro-batch). Type-ahead prefills whole micro-batches while the user types;
# ``run --chat`` uses the same size, so both compute every micro-batch alike and agree bit for bit.
# Smaller micro-batches leave less for Enter but, below a budget that holds every leaf, each one
# streams most of the experts again (16 tokens x top-8 of 64 select ~56 of them per layer): 64
# measured best for a typed 40-word prompt at a 25% budget (see README). SMOE_CHAT_UBATCH changes
# it for both commands (experiments, tests).
CHAT_UBATCH = int(os.environ.get("SMOE_CHAT_UBATCH", "64"))

# Marks the end of the text being typed in a rendered prompt (a private-use character).
_MARK = "\ue000"
PLAIN_STOP = "\nUser:"


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


def clean_text(text: str) -> str:
    """Text safe for llama.cpp: undecodable bytes (surrogate escapes) become U+FFFD, NULs go."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "replace")
    return data.decode("utf-8", "replace").replace("\x00", "")


# Control characters a random or broken model may produce: shown as U+FFFD, never sent raw.
_UNPRINTABLE = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def printable(text: str) -> str:
    """Model output safe for a terminal: control characters (but tab and newline) become U+FFFD."""
    return text.translate(_UNPRINTABLE)


class ChatTemplate:
    """How a conversation becomes prompt text for one model."""

    def __init__(self, template: bytes | None, note: str = "") -> None:
        self.template = template
        self.note = note  # why the fallback is used, when it is

    @classmethod
    def of(cls, model: llama_cpp.llama_model_p) -> "ChatTemplate":
        """The model's own template when llama.cpp can render it, else the plain fallback."""
        tmpl = llama_cpp.llama_model_chat_template(model, None)
        if not tmpl:
            return cls(None, "the model has no chat template")
        t = cls(tmpl)
        if t._apply([Message("user", "x")], True) is None:
            return cls(None, "llama.cpp does not know the model's chat template")
        return t

    @property
    def name(self) -> str:
        return "the model's chat template" if self.template else f"plain User:/Assistant: format ({self.note})"

    @property
    def stop_text(self) -> str | None:
        """Text that ends a reply (the fallback format only)."""
        return None if self.template else PLAIN_STOP

    def render(self, messages: Sequence[Message], add_assistant: bool = True) -> str:
        """The prompt text of ``messages``, ending with the assistant's turn opening when asked."""
        if self.template is None:
            return _render_plain(messages, add_assistant)
        text = self._apply(messages, add_assistant)
        if text is None:  # checked in of(); a template that fails later is a llama.cpp bug
            raise RuntimeError("llama.cpp could not apply the chat template")
        return text

    def typed_prefix(self, messages: Sequence[Message], typed: str) -> str | None:
        """The prompt text up to the end of a user message still being typed (None if unknown).

        Rendered with a marker after ``typed``: what comes before the marker is what the final
        prompt starts with, whatever the user types next."""
        text = self.render([*messages, Message("user", typed + _MARK)], add_assistant=False)
        i = text.rfind(_MARK)
        return text[:i] if i >= 0 else None

    def reply_end(self, messages: Sequence[Message]) -> str | None:
        """The prompt text up to the end of the last message, a reply (None if unknown): where
        the tokens the model generated end. What the template adds after it starts the next turn."""
        if not messages or messages[-1].role != "assistant":
            return None
        last = messages[-1]
        text = self.render([*messages[:-1], Message(last.role, last.content + _MARK)], add_assistant=False)
        i = text.rfind(_MARK)
        return text[:i] if i >= 0 else None

    def _apply(self, messages: Sequence[Message], add_assistant: bool) -> str | None:
        n = len(messages)
        keep = [(m.role.encode(), clean_text(m.content).encode()) for m in messages]  # alive for the call
        arr = (llama_cpp.llama_chat_message * max(n, 1))()
        for i, (role, content) in enumerate(keep):
            arr[i].role = role
            arr[i].content = content
        size = 256 + 2 * sum(len(c) + len(r) for r, c in keep)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            got = llama_cpp.llama_chat_apply_template(self.template, arr, n, add_assistant, buf, size)
            if got < 0:
                return None
            if got <= size:
                return buf.raw[:got].decode("utf-8", "replace")
            size = got
        return None


def _render_plain(messages: Sequence[Message], add_assistant: bool) -> str:
    parts: list[str] = []
    for m in messages:
        content = clean_text(m.content)
        if m.role == "system":
            parts.append(f"{content}\n\n")
        elif m.role == "assistant":
            parts.append(f"Assistant: {content.strip()}\n")
        else:
            parts.append(f"User: {content}\n")
    if add_assistant:
        parts.append("Assistant:")
    return "".join(parts)


def conversation(system: str | None, user: str) -> list[Message]:
    """The messages of a one-turn chat: an optional system message and the user's."""
    return ([Message("system", system)] if system else []) + [Message("user", user)]


class ReplyText:
    """A reply's text as its token pieces arrive: complete UTF-8 only, cut before the first stop
    text (one, several, or none).

    ``add`` returns what can be shown now; text that may be the start of a stop text is held
    back until it is known not to be."""

    def __init__(self, stop: str | list[str] | None) -> None:
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.text = ""
        self.stopped = False
        self._shown = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self.text += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if self.stops and not self.stopped:
            # Held-back text covers any stop text's start, so a match starts at _shown or later.
            found = [i for i in (self.text.find(s, self._shown) for s in self.stops) if i >= 0]
            if found:
                i = min(found)
                self.text, self.stopped, safe = self.text[:i], True, i
            elif not final:
                safe -= max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                             if self.text.endswith(s[:k])), default=0)
        out = self.text[self._shown : safe]
        self._shown = max(self._shown, safe)
        return out
