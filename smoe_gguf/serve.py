"""`smoe-gguf serve`: the engine behind OpenAI's HTTP API (Starlette on uvicorn).

**One engine, one thread.** The engine is not thread-safe: every engine call runs on the
:class:`Service`'s worker thread, which takes requests in arrival order from a bounded queue.
A request that finds ``queue`` others waiting (beside the one being answered) gets 503 with
``Retry-After``. The HTTP side (the event loop) checks requests, renders and tokenizes prompts,
and passes each generated piece of text on to its client.

**The KV cache** keeps what the last request left in it: its prompt and its reply tokens. A new
prompt keeps the longest prefix of it that is *bit-exact* for that prompt, and only the rest is
decoded. Bit-exact means computed in the very micro-batches a prefill of the whole prompt from
position 0 would use (``n_batch`` chunks split by ``n_ubatch``, as ``run --chat`` does): the worker
records the micro-batch each cached token was decoded in, keeps the cached micro-batches that are
also the prompt's own (same span, same tokens) and decodes the prompt's remaining micro-batches one
by one. So a request's tokens never depend on what came before it; a conversation's next turn
reuses its earlier turns up to the last whole micro-batch of the previous prompt (reply tokens are
decoded one at a time, which a fresh prefill never does).

**Cancelling.** A client that goes away (mid-stream or while waiting) sets its job's cancel event;
the worker checks it after each token, so the engine is free at the next token. On Ctrl-C the
running reply stops at its next token, queued requests are refused, the server closes.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import llama_session as ls
from . import openai_api as api
from . import template as tpl
from .chat import common_prefix, segments
from .engine import Engine, RunStats
from .errors import SmoeError
from .openai_api import ApiError

log = logging.getLogger("smoe_gguf.serve")

DEFAULT_QUEUE = 16
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BODY = 8 << 20
RETRY_AFTER_SECONDS = 1
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


# --------------------------------------------------------------------------------- the worker


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens found in the KV cache, not decoded again


@dataclass
class Failed:
    error: ApiError


Event = Delta | Done | Failed


@dataclass
class Job:
    """One generation: the prompt's tokens, how to sample, where the text goes."""

    tokens: list[int]
    max_tokens: int
    sampling: ls.Sampling
    stops: list[str]
    emit: Callable[[Event], None]  # called on the worker thread
    cancel: threading.Event


@dataclass
class Figures:
    """The server's own counters (the engine's are in :class:`RunStats`)."""

    requests: Counter[tuple[str, int]]
    rejected: int = 0
    completions: int = 0
    cancelled: int = 0
    tokens_generated: int = 0
    prompt_tokens_prefilled: int = 0
    prompt_tokens_reused: int = 0


class Service:
    """The engine, the one thread that runs it (a bounded FIFO of jobs) and the figures."""

    def __init__(self, engine: Engine, model_id: str, queue_size: int = DEFAULT_QUEUE,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if queue_size < 0:
            raise SmoeError("--queue must be 0 or more", 2)
        self.eng = engine
        self.template = tpl.ChatTemplate.of(engine.model)
        self.model_id = model_id
        self.queue_size = queue_size
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.figures = Figures(Counter())
        self.current: Job | None = None  # the job being generated (worker thread's)
        self.snapshot: RunStats = engine.stats()
        self._snapshot_at = time.monotonic()
        self.kv: list[int] = []  # the tokens in the KV cache
        self.kv_segs: list[tuple[int, int]] = []  # the micro-batch each of them was decoded in
        self._jobs: deque[Callable[[], None]] = deque()
        self._pending = 0  # jobs queued or running
        self._closing = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="smoe-serve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    @property
    def waiting(self) -> int:
        with self._cv:
            return len(self._jobs)

    @property
    def pending(self) -> int:
        with self._cv:
            return self._pending

    def submit(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` for the worker thread, or raise a 503 when the queue is full."""
        with self._cv:
            if self._closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self._pending > self.queue_size:
                self.figures.rejected += 1
                raise ApiError(503, f"the server is busy: {self._pending} requests ahead and the queue holds "
                               f"{self.queue_size}; retry later", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self._pending += 1
            self._jobs.append(fn)
            self._cv.notify_all()

    def generate_later(self, job: Job) -> None:
        self.submit(lambda: self._generate(job))

    def stop(self) -> None:
        """Stop the running generation at its next token and refuse what is queued or comes."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()

    def close(self) -> None:
        self.stop()
        self._thread.join()

    # ------------------------------------------------------------------ worker thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closing:
                    self._cv.wait()
                if not self._jobs:
                    return
                fn = self._jobs.popleft()
            try:
                fn()
            except Exception:  # noqa: BLE001 - a job's failure must not end the worker
                log.exception("job failed")
            finally:
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def _generate(self, job: Job) -> None:
        if job.cancel.is_set():
            job.emit(Failed(ApiError(499, "the client went away", code="cancelled")))
            self.figures.cancelled += 1
            return
        if self._closing:
            job.emit(Failed(ApiError(503, "the server is shutting down", code="shutting_down")))
            return
        self.current = job
        try:
            self._run(job)
        except SmoeError as e:
            self._resync()
            job.emit(Failed(ApiError(500, f"generation failed: {e}", code="engine_error")))
        except Exception as e:  # noqa: BLE001 - answered, logged, and the KV cache started over
            log.exception("generation failed")
            self._resync()
            job.emit(Failed(ApiError(500, f"generation failed: {type(e).__name__}", code="engine_error")))
        finally:
            self.current = None
            self._publish()

    def _run(self, job: Job) -> None:
        eng, final = self.eng, job.tokens
        keep, layout = self.reusable(final)
        self._truncate(keep)
        rest = [seg for seg in layout if seg[0] >= keep]
        for s, e in rest[:-1]:
            if self._stopping(job):  # the client left, or the server stops: between micro-batches
                job.emit(Failed(ApiError(499, "the client went away", code="cancelled") if job.cancel.is_set()
                                else ApiError(503, "the server is shutting down", code="shutting_down")))
                return
            self._decode(final[s:e], (s, e))
        s, e = rest[-1]
        reply = tpl.ReplyText(job.stops)
        tokens: list[int] = []
        finish, interrupted = "length", False
        steps = eng.stream(final[s:e], min(job.max_tokens, eng.n_ctx - len(final)), job.sampling, stop_at_eog=True)
        try:
            for step in steps:
                if not tokens:  # the prompt's last micro-batch is in
                    self.kv += final[s:e]
                    self.kv_segs.append((s, e))
                    self.figures.prompt_tokens_prefilled += len(final) - keep
                    self.figures.prompt_tokens_reused += keep
                tokens.append(step.token)
                if eng.is_eog(step.token):
                    finish = "stop"
                    break
                shown = reply.add(step.piece)
                if shown:
                    job.emit(Delta(shown))
                if reply.stopped:
                    finish = "stop"
                    break
                if self._stopping(job):
                    self.figures.cancelled += job.cancel.is_set()
                    interrupted = True
                    break
                self._publish(every=1.0)
        finally:
            steps.close()
            decoded = eng.n_past - len(self.kv)  # generated tokens in the KV cache (all but the last)
            if tokens and 0 <= decoded <= len(tokens):
                self.kv += tokens[:decoded]
                self.kv_segs += [(p, p + 1) for p in range(len(final), len(final) + decoded)]
            if eng.n_past != len(self.kv):  # never expected; do not trust the KV cache if it happens
                self._resync()
        rest_text = reply.finish()
        if rest_text:
            job.emit(Delta(rest_text))
        self.figures.completions += 1
        self.figures.tokens_generated += len(tokens)
        if interrupted and not job.cancel.is_set():
            job.emit(Failed(ApiError(503, "the server is shutting down; the reply was cut", code="shutting_down")))
            return
        job.emit(Done(finish, len(final), len(tokens), keep))

    def reusable(self, final: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """(tokens of the KV cache that ``final`` keeps, ``final``'s micro-batches from position 0).

        The kept tokens are whole micro-batches of ``final``'s own layout, decoded as such, and at
        least the last token of ``final`` is left to decode (its logits start the reply)."""
        eng = self.eng
        layout = segments(0, 0, len(final), eng.n_ubatch, eng.n_batch)
        common = min(common_prefix(self.kv, final), len(final) - 1)
        keep = 0
        for have, want in zip(self.kv_segs, layout):
            if have != want or want[1] > common:
                break
            keep = want[1]
        return keep, layout

    def _stopping(self, job: Job) -> bool:
        return job.cancel.is_set() or self._closing

    def _decode(self, tokens: list[int], seg: tuple[int, int]) -> None:
        self.eng.decode(tokens)
        self.kv += tokens
        self.kv_segs.append(seg)

    def _truncate(self, n: int) -> None:
        if n < len(self.kv):
            self.eng.truncate(n)
            del self.kv[n:]
            self.kv_segs = [seg for seg in self.kv_segs if seg[1] <= n]

    def _resync(self) -> None:
        """After a failure the KV cache is not trusted: start it over."""
        try:
            self.eng.reset()
        finally:
            self.kv, self.kv_segs = [], []

    def _publish(self, every: float = 0.0) -> None:
        """Refresh the engine figures /metrics reads (taken here: the engine is this thread's)."""
        now = time.monotonic()
        if now - self._snapshot_at >= every:
            self.snapshot, self._snapshot_at = self.eng.stats(), now


# --------------------------------------------------------------------------------- HTTP


class EventStream(Response):
    """A streamed completion: Server-Sent Events in OpenAI's chunk format, ending ``data: [DONE]``."""

    media_type = "text/event-stream"

    def __init__(self, events: asyncio.Queue[Event | None], job: Job, shapes: api.Shapes,
                 include_usage: bool, note: dict[str, Any]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.job, self.shapes, self.include_usage, self.note = events, job, shapes, include_usage, note

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_watch_disconnect(receive, self.job.cancel, self.events))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if self.shapes.chat:  # the first chunk names the role
                await _send_body(send, api.sse(self.shapes.chunk(None, first=True)))
            while True:
                ev = await self.events.get()
                if ev is None:  # the client went away
                    self.note["outcome"] = "cancelled"
                    return
                if isinstance(ev, Delta):
                    await _send_body(send, api.sse(self.shapes.chunk(ev.text)))
                    continue
                if isinstance(ev, Failed):
                    self.note["outcome"] = f"error {ev.error.status}"
                    await _send_body(send, api.sse(ev.error.body()))
                else:
                    _note_done(self.note, ev)
                    await _send_body(send, api.sse(self.shapes.chunk(None, ev.finish_reason)))
                    if self.include_usage:
                        await _send_body(send, api.sse(self.shapes.usage_chunk(_usage(ev))))
                    await _send_body(send, api.sse("[DONE]"))
                break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            self.note["outcome"] = "cancelled"
        finally:
            watcher.cancel()
            self.job.cancel.set()


async def _send_body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _watch_disconnect(receive: Receive, cancel: threading.Event, events: asyncio.Queue[Event | None]) -> None:
    """Wait for the client to go away (the request body is read by then); cancel its job."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            events.put_nowait(None)
            return


def _usage(ev: Done) -> dict[str, Any]:
    return api.usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)


def _note_done(note: dict[str, Any], ev: Done) -> None:
    note.update(outcome=ev.finish_reason, prompt=ev.prompt_tokens, cached=ev.cached_tokens,
                completion=ev.completion_tokens)


class Handlers:
    """The endpoints, over one :class:`Service`."""

    def __init__(self, service: Service, max_body: int) -> None:
        self.svc = service
        self.max_body = max_body

    async def read_json(self, request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.max_body:
            raise ApiError(413, f"the request body is {size} bytes; the limit is {self.max_body}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ApiError(413, f"the request body is over the limit of {self.max_body} bytes",
                               code="request_too_large")
        return api.parse_json(bytes(body))

    async def chat(self, request: Request) -> Response:
        req = api.parse_chat(await self.read_json(request), self.svc.model_id)
        text = self.svc.template.render(req.messages)
        stops = [s for s in (self.svc.template.stop_text,) if s] + req.params.stop
        return await self.complete(request, text, req.params, stops, chat=True)

    async def completions(self, request: Request) -> Response:
        req = api.parse_completion(await self.read_json(request), self.svc.model_id)
        return await self.complete(request, req.prompt, req.params, req.params.stop, chat=False)

    async def complete(self, request: Request, text: str, p: api.GenParams, stops: list[str], chat: bool) -> Response:
        eng = self.svc.eng
        tokens = await asyncio.to_thread(eng.tokenize, text)
        param = "messages" if chat else "prompt"
        if not tokens:
            raise ApiError(400, f"the {param} has no tokens", param, "invalid_value")
        if len(tokens) >= eng.n_ctx:
            raise ApiError(400, f"the prompt is {len(tokens)} tokens and the context holds {eng.n_ctx} "
                           f"(with room for the reply); shorten the {param} or restart with a larger --ctx",
                           param, "context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        cancel = threading.Event()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: nobody is listening
                cancel.set()

        seed = p.seed if p.seed is not None else secrets.randbits(32)
        job = Job(tokens, p.max_tokens or self.svc.default_max_tokens, ls.Sampling(p.temperature, seed, p.top_p),
                  stops, emit, cancel)
        self.svc.generate_later(job)
        shapes = api.Shapes(chat, self.svc.model_id)
        note: dict[str, Any] = request.scope.setdefault("smoe", {})
        if p.stream:
            return EventStream(events, job, shapes, p.include_usage, note)
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, cancel, events))
        parts: list[str] = []
        try:
            while True:
                ev = await events.get()
                if ev is None:
                    note["outcome"] = "cancelled"
                    return Response(status_code=499)  # nobody reads it
                if isinstance(ev, Delta):
                    parts.append(ev.text)
                elif isinstance(ev, Failed):
                    raise ev.error
                else:
                    _note_done(note, ev)
                    return JSONResponse(shapes.whole("".join(parts), ev.finish_reason, _usage(ev)))
        finally:
            watcher.cancel()
            cancel.set()

    async def models(self, request: Request) -> Response:
        return JSONResponse(api.models_list(self.svc.model_id, self.svc.created))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.svc.model_id, "queued": self.svc.waiting})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(prometheus(self.svc), media_type="text/plain; version=0.0.4")


def prometheus(svc: Service) -> str:
    """The figures in Prometheus' text format."""
    st, f = svc.snapshot, svc.figures
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP smoe_{name} {help_}", f"# TYPE smoe_{name} {kind}"])
        lines.extend(f"smoe_{name}{labels} {value:g}" if isinstance(value, float) else f"smoe_{name}{labels} {value}"
                     for labels, value in samples)

    metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
           [(f'{{endpoint="{ep}",code="{code}"}}', n) for (ep, code), n in sorted(f.requests.items())])
    metric("requests_rejected_total", "counter", "Requests refused with 503 because the queue was full.",
           [("", f.rejected)])
    metric("requests_cancelled_total", "counter", "Generations stopped because the client went away.",
           [("", f.cancelled)])
    metric("queue_waiting", "gauge", "Requests waiting for the engine.", [("", svc.waiting)])
    metric("queue_size", "gauge", "Requests that may wait beside the one being answered.", [("", svc.queue_size)])
    metric("tokens_generated_total", "counter", "Tokens generated.", [("", f.tokens_generated)])
    metric("prompt_tokens_prefilled_total", "counter", "Prompt tokens decoded.", [("", f.prompt_tokens_prefilled)])
    metric("prompt_tokens_reused_total", "counter", "Prompt tokens kept from the KV cache (not decoded again).",
           [("", f.prompt_tokens_reused)])
    metric("hit_rate", "gauge", "Leaf accesses that found the leaf resident.", [("", float(st.hit_rate))])
    metric("leaf_hits_total", "counter", "Leaf accesses that found the leaf resident.", [("", st.hits)])
    metric("leaf_misses_total", "counter", "Leaf accesses that had to read the leaf.", [("", st.misses)])
    metric("bytes_read_total", "counter", "Leaf bytes read from the shards.", [("", st.bytes_read)])
    metric("stall_seconds_total", "counter", "Seconds the computation waited for leaves.", [("", float(st.stall_seconds))])
    metric("budget_bytes", "gauge", "The X-Slot budget.", [("", st.budget_bytes)])
    metric("resident_bytes", "gauge", "Leaf bytes resident in the X-Slot.", [("", st.resident_bytes_now)])
    metric("peak_resident_bytes", "gauge", "Most leaf bytes resident at once.", [("", st.peak_resident_bytes)])
    metric("context_tokens", "gauge", "Tokens in the KV cache.", [("", len(svc.kv))])
    metric("context_size", "gauge", "The context length.", [("", svc.eng.n_ctx)])
    return "\n".join(lines) + "\n"


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class RequestLayer:
    """The outer ASGI layer: the API key, OpenAI-shaped errors for anything raised, one log
    line per request and the request counts /metrics shows."""

    def __init__(self, app: ASGIApp, svc: Service, api_key: str | None) -> None:
        self.app, self.svc = app, svc
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]
        started = [False]
        note: dict[str, Any] = scope.setdefault("smoe", {})

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            await send(message)

        path = scope.get("path", "")
        try:
            if self.key is not None and path != "/health" and not self._authorized(scope):
                err = ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", type_="authentication_error",
                               headers={"WWW-Authenticate": "Bearer"})
                await _error_response(err)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except ApiError as e:
            if not started[0]:
                await _error_response(e)(scope, receive, sending)
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("request failed")
            if not started[0]:
                await _error_response(ApiError(500, "internal error", code="internal_error"))(scope, receive, sending)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.svc.figures.requests[(endpoint, status[0])] += 1
            log.info(_log_line(scope, status[0], time.perf_counter() - t0, note))

    def _authorized(self, scope: Scope) -> bool:
        got = dict(scope.get("headers") or []).get(b"authorization", b"")
        return self.key is not None and hmac.compare_digest(got, self.key)


def _log_line(scope: Scope, status: int, seconds: float, note: dict[str, Any]) -> str:
    client = scope.get("client") or ("-", 0)
    line = f'{client[0]} "{scope.get("method", "-")} {scope.get("path", "")}" {status} {seconds:.3f}s'
    if "prompt" in note:
        line += (f" prompt {note['prompt']} ({note['cached']} cached) completion {note['completion']}"
                 f" {note['outcome']}")
    elif "outcome" in note:
        line += f" {note['outcome']}"
    return line


def create_app(service: Service, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY) -> ASGIApp:
    """The ASGI application serving ``service``."""
    h = Handlers(service, max_body)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        request.scope.setdefault("smoe", {})["outcome"] = exc.code or exc.type
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        code=code, headers=dict(exc.headers or {})))

    routes = [
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/health", h.health, methods=["GET"]),
        Route("/metrics", h.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})
    return RequestLayer(app, service, api_key)


# --------------------------------------------------------------------------------- running it


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line SmoeError."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        raise SmoeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def make_server(app: ASGIApp, service: Service) -> Any:
    """A uvicorn server for ``app`` whose Ctrl-C also stops the running generation."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=10)
    return Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Stop(Exception):
    """SIGTERM, turned into a clean stop."""


def _raise_stop(_sig: int, _frame: Any) -> None:
    raise _Stop


def serve(model: Any, host: str, port: int, api_key: str | None, queue_size: int, max_tokens: int,
          max_body: int, model_name: str | None, engine_options: dict[str, Any]) -> None:
    """`smoe-gguf serve`: load the model, listen, answer until Ctrl-C (or SIGTERM)."""
    from pathlib import Path

    from .console import err, human

    if queue_size < 0:
        raise SmoeError("--queue must be 0 or more", 2)
    if max_tokens < 1:
        raise SmoeError("--max-tokens must be at least 1", 2)
    if not _is_loopback(host) and not api_key:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it",
                  highlight=False, soft_wrap=True)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    sock = bind(host, port)
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with sock, Engine(model, n_ubatch=tpl.CHAT_UBATCH, **engine_options) as eng:
            for w in eng.warnings:
                err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
            svc = Service(eng, model_name or Path(model).name, queue_size, max_tokens)
            try:
                server = make_server(create_app(svc, api_key, max_body), svc)
                err.print(f"serving {svc.model_id} at {url_of(sock)}/v1 | {svc.template.name} | budget "
                          f"{human(eng.budget)} | context {eng.n_ctx} tokens | queue {queue_size} | Ctrl-C stops",
                          highlight=False, soft_wrap=True)
                try:
                    server.run(sockets=[sock])
                except KeyboardInterrupt:  # the Ctrl-C uvicorn raises again once it has shut down
                    pass
            finally:
                svc.close()
    except _Stop:  # SIGTERM: a clean stop too
        pass
    finally:
        signal.signal(signal.SIGTERM, old_term)
    err.print("stopped", highlight=False)
