"""OpenAI's HTTP API, the parts `smoe-gguf serve` speaks: request checks and response shapes.

Requests are checked field by field into :class:`ChatRequest` / :class:`CompletionRequest`; any
fault raises :class:`ApiError`, which the server sends as OpenAI's error object
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status. Fields this server does not
use (penalties, ``user``, ``tools``...) are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .template import Message

MAX_STOPS = 4  # OpenAI's limit on `stop` sequences
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenParams:
    """What a request asks of the sampler and when generation ends."""

    max_tokens: int | None = None  # None: the server's default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


@dataclass
class ChatRequest:
    messages: list[Message]
    params: GenParams


@dataclass
class CompletionRequest:
    prompt: str
    params: GenParams


# --------------------------------------------------------------------------------- parsing


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def parse_chat(data: dict[str, Any], model_id: str) -> ChatRequest:
    check_model(data, model_id)
    raw = data.get("messages")
    if raw is None:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(raw, list):
        raise ApiError(400, "'messages' must be an array of message objects", "messages", "invalid_type")
    if not raw:
        raise ApiError(400, "'messages' must hold at least one message", "messages", "empty_array")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    return ChatRequest(messages, _params(data, ("max_tokens", "max_completion_tokens")))


def parse_completion(data: dict[str, Any], model_id: str) -> CompletionRequest:
    check_model(data, model_id)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or an array of one string)", "prompt", "invalid_type")
    if not prompt:
        raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
    s = _params(data, ("max_tokens",))
    if s.max_tokens is None:
        s.max_tokens = 16  # OpenAI's default for completions
    return CompletionRequest(prompt, s)


def check_model(data: dict[str, Any], model_id: str) -> None:
    """``model`` may be left out; when given it must name the served model."""
    model = data.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    if model != model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_id}'",
                       "model", "model_not_found")


def _message(m: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
    role = m.get("role")
    if not isinstance(role, str):
        raise ApiError(400, f"'{where}.role' must be a string", f"{where}.role", "invalid_type")
    if role not in ROLES:
        raise ApiError(400, f"'{where}.role' {role!r} is not supported (use system, user or assistant)",
                       f"{where}.role", "invalid_value")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"'{where}.content[{j}]' must be a text part ({{\"type\": \"text\", "
                               f"\"text\": ...}}); this model reads text only", f"{where}.content", "invalid_value")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"'{where}.content' must be a string or an array of text parts",
                       f"{where}.content", "invalid_type")
    return Message(ROLES[role], content)


def _params(data: dict[str, Any], max_names: tuple[str, ...]) -> GenParams:
    s = GenParams()
    for name in max_names:
        if data.get(name) is not None:
            s.max_tokens = _int(data, name, lo=1)
    if data.get("temperature") is not None:
        s.temperature = _number(data, "temperature", 0.0, 2.0)
    if data.get("top_p") is not None:
        s.top_p = _number(data, "top_p", 0.0, 1.0)
        if s.top_p == 0.0:
            raise ApiError(400, "'top_p' must be greater than 0", "top_p", "invalid_value")
    if data.get("seed") is not None:
        s.seed = _int(data, "seed")
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not (isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
            raise ApiError(400, "'stop' must be a string or an array of strings", "stop", "invalid_type")
        if len(stop) > MAX_STOPS:
            raise ApiError(400, f"'stop' holds at most {MAX_STOPS} sequences", "stop", "invalid_value")
        s.stop = [x for x in stop if x]
    if data.get("n") is not None and _int(data, "n", lo=1) != 1:
        raise ApiError(400, "'n' must be 1: this server generates one choice per request", "n", "invalid_value")
    stream = data.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
        s.stream = stream
    opts = data.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        inc = opts.get("include_usage", False)
        if not isinstance(inc, bool):
            raise ApiError(400, "'stream_options.include_usage' must be a boolean",
                           "stream_options.include_usage", "invalid_type")
        s.include_usage = inc
    return s


def _int(data: dict[str, Any], name: str, lo: int | None = None) -> int:
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer", name, "invalid_type")
    if lo is not None and v < lo:
        raise ApiError(400, f"'{name}' must be at least {lo}", name, "invalid_value")
    return v


def _number(data: dict[str, Any], name: str, lo: float, hi: float) -> float:
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError(400, f"'{name}' must be a number", name, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be between {lo:g} and {hi:g}", name, "invalid_value")
    return float(v)


# --------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """Token counts; ``prompt_tokens_details.cached_tokens``: prompt tokens found in the KV cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Shapes:
    """Response objects of one request (one id, one creation time)."""

    def __init__(self, chat: bool, model_id: str) -> None:
        self.chat = chat
        self.model = model_id
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def _choice(self, text: str | None, finish: str | None, delta: bool, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                d["content"] = text
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text or "", "refusal": None},
                "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed response."""
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [self._choice(text, finish, delta=False)], "usage": use}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed chunk: text, or the finish reason (the last chunk with a choice)."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [self._choice(text, finish, delta=True, first=first)]}

    def usage_chunk(self, use: dict[str, Any]) -> dict[str, Any]:
        """The chunk ``stream_options.include_usage`` asks for: no choice, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": use}


def sse(obj: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event carrying ``obj`` (``"[DONE]"`` as it is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "smoe-gguf"}]}
