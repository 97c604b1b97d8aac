"""`smoe-gguf chat`: a multi-turn chat whose prompt is prefilled while it is being typed.

**Threads.** The engine (one llama.cpp context and its X-Slot) is not thread-safe, so every engine
call runs on one worker thread (:class:`ChatWorker`). The terminal (prompt_toolkit) runs on the
main thread and hands the worker (1) the text being typed, in a one-slot mailbox where only the
newest text counts (keystrokes coalesce), and (2) jobs (a turn, ``/reset``, ``/budget``,
``/stats``), which always go before type-ahead work.

**The KV cache.** The worker keeps the list of tokens the KV cache holds and the conversation's
own tokens (``history``): prompts as tokenized, replies as generated. The next prompt is
``history`` plus the tokens of what the template adds after the last reply (its end marker, the
new user turn, the assistant opening), as llama.cpp's own chat does; so earlier turns stay in the
KV cache as they are and only the new tokens are decoded. (Re-tokenizing a reply's text would not
do: a generated token sequence is often not what its text tokenizes to.) Whatever the KV cache
holds beyond the longest common prefix with the prompt is removed (``Engine.truncate``). Where the
template cannot be split that way, the whole conversation is re-rendered and the same
common-prefix rule applies.

**Type-ahead.** For the text being typed the worker renders the conversation with the partial user
message (``ChatTemplate.typed_prefix``) and keeps only *stable* tokens: those of the text before
the last word (and before the whitespace ahead of it), and only as far as they agree with the
tokens of the whole partial text. A word being typed, or the space in front of it, may still merge
with what comes next (BPE). Stable tokens are decoded in whole micro-batches placed exactly where a
single prefill of the same prompt splits it (``run --chat``): every micro-batch holds the same
tokens at the same positions, so llama.cpp computes the same logits bit for bit. (Chunks of other
sizes do not: the batch size changes llama.cpp's kernels, flash attention's in particular.) When
the user deletes or retypes, the KV cache is rolled back to the last micro-batch boundary inside
the common prefix. The leaves those tokens route to are made resident on the way. On Enter only
the rest is decoded.

**Ctrl-C** during a reply stops sampling after the current token; the partial reply stays in the
conversation (and in the KV cache), as it was shown.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import llama_cpp

from .console import err, human, out
from .engine import Engine
from .errors import SmoeError
from .readpool import DEFAULT_IO_DEPTH
from .template import ChatTemplate, Message, ReplyText, clean_text

T = TypeVar("T")

HELP = """\
commands:
  /reset        start a new conversation (the system message stays)
  /stats        time to first token with and without type-ahead, paging figures (/stats json: one JSON object)
  /budget [B]   show or change the X-Slot budget live (512MiB, 4G, 25%); shrinking evicts at once
  /typeahead on|off   prefill the prompt while you type (on by default)
  /help         this text
  /exit         leave (Ctrl-D does too)
Ctrl-C stops a reply and keeps the chat; at the prompt it clears the line."""


# --------------------------------------------------------------------------------- micro-batches


def segment_start(anchor: int, pos: int, n_ubatch: int, n_batch: int) -> int:
    """Start of the micro-batch that holds ``pos`` when the tokens from ``anchor`` on are decoded
    in one go (``Engine.decode``: chunks of ``n_batch``, which llama.cpp splits by ``n_ubatch``)."""
    c, r = divmod(pos - anchor, n_batch)
    return anchor + c * n_batch + (r // n_ubatch) * n_ubatch


def segment_end(anchor: int, pos: int, n_ubatch: int, n_batch: int) -> int:
    """End of that micro-batch when it is whole."""
    c, r = divmod(pos - anchor, n_batch)
    return anchor + c * n_batch + min((r // n_ubatch + 1) * n_ubatch, n_batch)


def segments(anchor: int, start: int, end: int, n_ubatch: int, n_batch: int) -> list[tuple[int, int]]:
    """The micro-batches covering [start, end); ``start`` must be a micro-batch boundary."""
    segs: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        nxt = min(segment_end(anchor, pos, n_ubatch, n_batch), end)
        segs.append((pos, nxt))
        pos = nxt
    return segs


def tokenize_more(eng: Engine, text: str) -> list[int]:
    """Tokens of ``text`` that continue a sequence: special tokens parsed, no BOS added."""
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(eng.vocab, data, len(data), buf, n_max, False, True)
    if n < 0:
        buf = (llama_cpp.llama_token * -n)()
        n = llama_cpp.llama_tokenize(eng.vocab, data, len(data), buf, -n, False, True)
    if n < 0:
        raise SmoeError(f"llama.cpp could not tokenize the text (code {n})")
    return list(buf[:n])


def last_word_start(text: str) -> int:
    """Where the last word, and the whitespace before it, begin: what more typing may change."""
    j = len(text)
    while j and not text[j - 1].isspace():
        j -= 1
    while j and text[j - 1].isspace():
        j -= 1
    return j


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --------------------------------------------------------------------------------- the worker


@dataclass
class TurnResult:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0  # tokens this turn's prompt adds to the conversation in the KV cache
    ready_tokens: int = 0  # of those, already in the KV cache when Enter was pressed (type-ahead)
    typeahead_seconds: float = 0.0  # what decoding the ready tokens took, before Enter
    ttft_seconds: float = 0.0  # Enter -> first token
    decode_tps: float = 0.0
    bytes_per_token: float = 0.0  # leaf bytes read per generated token
    stopped: bool = False  # Ctrl-C
    error: str | None = None


@dataclass
class _Turn:
    user: str
    entered: float  # time.perf_counter() when Enter was pressed
    sink: queue.Queue[str]
    cancel: threading.Event


class ChatWorker:
    """Owns the engine; runs every engine call on its own thread."""

    def __init__(self, engine: Engine, template: ChatTemplate, system: str | None = None, n_tokens: int = 256,
                 temp: float = 0.0, seed: int = 0, typeahead: bool = True) -> None:
        self.eng = engine
        self.template = template
        self.system = clean_text(system) if system else None
        self.n_tokens = n_tokens
        self.temp = temp
        self.seed = seed
        self.typeahead = typeahead
        self.messages: list[Message] = self._start()
        # The conversation's tokens: prompts as tokenized, replies as generated. None: unknown (the
        # next prompt is then the whole conversation re-rendered and tokenized).
        self.history: list[int] | None = []
        self._reply_end: str | None = None  # the rendered conversation up to where history ends
        self.kv: list[int] = []  # what the KV cache holds (engine.n_past == len(kv))
        self._cost: list[float] = []  # seconds spent decoding each of those tokens
        self.committed = 0  # KV tokens of the conversation so far (the rest: type-ahead)
        self.turns: list[TurnResult] = []
        self.typed_ready = 0  # stable tokens of the text being typed that are in the KV cache
        self.typeahead_error: str | None = None
        self.status: dict[str, Any] = {}
        self._stable_cache: tuple[str, list[int]] = ("\0", [])
        self._cv = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._typed: str | None = None
        self._busy = False
        self._closed = False
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="smoe-chat-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main thread side

    def typed(self, text: str) -> None:
        """The text being typed now (only the newest matters)."""
        if self.typeahead:
            with self._cv:
                self._typed = text
                self._cv.notify_all()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        with self._cv:
            self._jobs.append((fn, fut))
            self._cv.notify_all()
        return fut

    def call(self, fn: Callable[[], T]) -> T:
        return self.submit(fn).result()

    def turn(self, user: str, entered: float, sink: queue.Queue[str], cancel: threading.Event) -> Future[TurnResult]:
        """Answer ``user``; the reply's text goes to ``sink`` as it comes."""
        t = _Turn(user, entered, sink, cancel)
        fut: Future[TurnResult] = Future()
        with self._cv:
            self._typed = None
            self._jobs.append((lambda: self._turn(t), fut))
            self._cv.notify_all()
        return fut

    def wait_idle(self) -> None:
        """Wait until no job is queued or running and type-ahead has caught up with the text."""
        with self._cv:
            self._cv.wait_for(lambda: not self._jobs and self._typed is None and not self._busy)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._typed = None
            self._cv.notify_all()
        self._thread.join()

    # ------------------------------------------------------------------ worker thread side

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and self._typed is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for _fn, fut in self._jobs:
                        fut.cancel()
                    return
                job = self._jobs.popleft() if self._jobs else None
                typed = self._typed
                self._busy = True
            try:
                self._work(job, typed)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _work(self, job: tuple[Callable[[], Any], Future[Any]] | None, typed: str | None) -> None:
        if job is not None:
            fn, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._publish()
                    fut.set_exception(e)
                else:
                    self._publish()  # before the caller sees the result: figures are fresh
                    fut.set_result(result)
            return
        assert typed is not None
        try:
            done = self._typeahead_step(typed)
            self.typeahead_error = None
        except Exception as e:  # noqa: BLE001 - type-ahead is an optimisation: Enter still works
            self._resync()
            self.typeahead_error, done = str(e) or type(e).__name__, True
        self._publish()
        if done:
            with self._cv:
                if self._typed == typed:
                    self._typed = None

    def _start(self) -> list[Message]:
        return [Message("system", self.system)] if self.system else []

    def _decode(self, tokens: list[int]) -> None:
        t0 = time.perf_counter()
        self.eng.decode(tokens)
        dt = (time.perf_counter() - t0) / len(tokens)
        self.kv += tokens
        self._cost += [dt] * len(tokens)

    def _truncate(self, n: int) -> None:
        if n < len(self.kv):
            self.eng.truncate(n)
            del self.kv[n:], self._cost[n:]
            self.committed = min(self.committed, n)

    def _resync(self) -> None:
        """After a failure the KV cache is not trusted: start it over (the conversation stays)."""
        self.eng.reset()
        self.kv, self._cost, self.committed = [], [], 0

    def _boundary(self, common: int) -> tuple[int, int]:
        """(anchor, keep): micro-batches are laid out from the end of the conversation (``anchor``),
        as a single prefill of the new tokens would split them; ``keep`` is the last boundary
        within ``common`` tokens."""
        anchor = min(self.committed, common)
        return anchor, segment_start(anchor, common, self.eng.n_ubatch, self.eng.n_batch)

    def _tokens(self, text: str) -> list[int]:
        """The tokens of the rendered prompt ``text``. After the first turn: the conversation's
        tokens as they are (replies as generated, not as their text tokenizes), then the tokens
        of what the template adds after the last reply, as llama.cpp's own chat does."""
        end = self._reply_end
        if self.history and end is not None and text.startswith(end):
            return self.history + tokenize_more(self.eng, text[len(end):])
        return self.eng.tokenize(text)

    def _stable(self, typed: str) -> list[int]:
        """The tokens of the conversation plus ``typed`` that more typing will not change."""
        if self._stable_cache[0] == typed:
            return self._stable_cache[1]
        prefix = self.template.typed_prefix(self.messages, clean_text(typed))
        if prefix is None:
            tokens: list[int] = []
        else:
            cut = last_word_start(prefix)
            if self._reply_end is not None and prefix.startswith(self._reply_end):
                cut = max(cut, len(self._reply_end))
            a, b = self._tokens(prefix[:cut]), self._tokens(prefix)
            tokens = a[: common_prefix(a, b)]
        self._stable_cache = (typed, tokens)
        return tokens

    def _typeahead_step(self, typed: str) -> bool:
        """Decode at most one micro-batch of ``typed``'s stable tokens; True when there is no more."""
        if not self.typeahead:
            return True
        stable = self._stable(typed)
        anchor, keep = self._boundary(common_prefix(self.kv, stable))
        self._truncate(keep)
        self.typed_ready = keep - anchor
        end = segment_end(anchor, keep, self.eng.n_ubatch, self.eng.n_batch)
        if end > len(stable) or end >= self.eng.n_ctx:
            return True  # only part of a micro-batch is stable (it waits for Enter), or no room
        self._decode(stable[keep:end])
        self.typed_ready = end - anchor
        return False

    def _turn(self, t: _Turn) -> TurnResult:
        res = TurnResult()
        eng = self.eng
        msgs = [*self.messages, Message("user", clean_text(t.user))]
        final = self._tokens(self.template.render(msgs))
        if len(final) >= eng.n_ctx:
            res.error = (f"that message is too long: the prompt would be {len(final)} tokens and the context "
                         f"holds {eng.n_ctx}" + ("; /reset drops the earlier turns" if self.committed else "")
                         + ". Nothing was sent.")
            return res
        anchor, keep = self._boundary(min(common_prefix(self.kv, final), len(final) - 1))
        res.prompt_tokens = len(final) - anchor
        res.ready_tokens = keep - anchor
        res.typeahead_seconds = sum(self._cost[anchor:keep])
        reply = ReplyText(self.template.stop_text)
        first: list[int] = []
        try:
            self._truncate(keep)
            segs = segments(anchor, keep, len(final), eng.n_ubatch, eng.n_batch)
            for s, e in segs[:-1]:
                self._decode(final[s:e])

            def on_token(tok: int, piece: bytes) -> None:
                if not first:
                    res.ttft_seconds = time.perf_counter() - t.entered
                    first.append(eng.source.store.stats.bytes_read)
                if not eng.is_eog(tok):
                    shown = reply.add(piece)
                    if shown:
                        t.sink.put(shown)

            s, e = segs[-1]
            gen = eng.generate(final[s:e], min(self.n_tokens, eng.n_ctx - len(final)), temp=self.temp,
                               seed=self.seed, stop_at_eog=True, on_token=on_token,
                               should_stop=lambda: t.cancel.is_set() or reply.stopped)
        except SmoeError as ex:
            self._resync()
            res.error = str(ex)
            return res
        rest = reply.finish()
        if rest:
            t.sink.put(rest)
        self.kv = final + gen.tokens[:-1]  # the last token sampled is never decoded
        per = gen.stats.decode_seconds / max(1, len(gen.tokens) - 1)
        self._cost = self._cost[:s] + [gen.stats.prefill_seconds / (e - s)] * (e - s) + [per] * (len(gen.tokens) - 1)
        if eng.n_past != len(self.kv):  # never expected; do not trust the KV cache if it happens
            self._resync()
        self.committed = len(self.kv)
        self.messages = [*msgs, Message("assistant", reply.text)]
        ended = bool(gen.tokens) and eng.is_eog(gen.tokens[-1])
        # A reply cut at the fallback format's stop text holds tokens its message does not.
        self.history = None if reply.stopped else final + (gen.tokens[:-1] if ended else gen.tokens)
        self._reply_end = self.template.reply_end(self.messages)
        self._stable_cache = ("\0", [])
        res.tokens, res.text, res.stopped = gen.tokens, reply.text, t.cancel.is_set()
        res.decode_tps = gen.stats.decode_tps
        if first and len(gen.tokens) > 1:
            res.bytes_per_token = (eng.source.store.stats.bytes_read - first[0]) / (len(gen.tokens) - 1)
        self.turns.append(res)
        return res

    # ------------------------------------------------------------------ jobs (worker thread)

    def reset(self) -> None:
        self._resync()
        self.messages = self._start()
        self.history, self._reply_end, self._stable_cache = [], None, ("\0", [])
        self.typed_ready = 0

    def set_budget(self, budget: str) -> int:
        self.eng.set_budget(budget)
        return self.eng.budget

    def stats(self) -> dict[str, Any]:
        """Figures for /stats (time to first token with and without type-ahead, paging)."""
        with_ta = [r.ttft_seconds for r in self.turns if r.ready_tokens > 0]
        without = [r.ttft_seconds for r in self.turns if r.ready_tokens == 0]
        last = self.turns[-1] if self.turns else TurnResult()
        return {
            "turns": len(self.turns),
            "typeahead": self.typeahead,
            "last_turn": {k: v for k, v in asdict(last).items() if k not in ("tokens", "text")},
            # The last prompt without type-ahead: the same work after Enter, plus what the ready
            # tokens took to decode before it.
            "ttft_without_typeahead_estimate": round(last.ttft_seconds + last.typeahead_seconds, 4),
            "mean_ttft_with_typeahead": round(sum(with_ta) / len(with_ta), 4) if with_ta else None,
            "turns_with_typeahead": len(with_ta),
            "mean_ttft_without_typeahead": round(sum(without) / len(without), 4) if without else None,
            "turns_without_typeahead": len(without),
            **self.status,
            **self.eng.stats().as_dict(),
        }

    def _publish(self) -> None:
        """A snapshot for the status line (read by the main thread)."""
        eng, r = self.eng, self.eng.residency
        st = eng.stats()
        last = self.turns[-1] if self.turns else TurnResult()
        self.status = {
            "budget_bytes": eng.budget,
            "resident_bytes": r.used,
            "resident_leaves": r.n_resident,
            "hit_rate": st.hit_rate,
            "decode_tps": round(last.decode_tps, 2),
            "bytes_per_token": round(last.bytes_per_token),
            "n_past": eng.n_past,
            "n_ctx": eng.n_ctx,
            "typed_ready": self.typed_ready,
            "typeahead_error": self.typeahead_error,
        }


def status_line(s: dict[str, Any]) -> str:
    """Budget use, resident leaves, hit rate, decode speed, leaf bytes read per token, context."""
    pct = 100 * s["resident_bytes"] / s["budget_bytes"] if s["budget_bytes"] else 0.0
    tps = f"{s['decode_tps']:.1f} tok/s" if s["decode_tps"] else "- tok/s"
    return (f"X-Slot {human(s['resident_bytes'])}/{human(s['budget_bytes'])} ({pct:.0f}%) | "
            f"{s['resident_leaves']} leaves | hit {s['hit_rate'] * 100:.1f}% | {tps} | "
            f"{human(s['bytes_per_token'])}/tok | ctx {s['n_past']}/{s['n_ctx']}")


# Control characters a random or broken model may produce: shown as U+FFFD, never sent raw.
_UNPRINTABLE = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def printable(text: str) -> str:
    return text.translate(_UNPRINTABLE)


# --------------------------------------------------------------------------------- the terminal


class ChatUI:
    """The main thread: reads lines (prompt_toolkit on a terminal), prints replies and figures."""

    def __init__(self, worker: ChatWorker, interactive: bool, debug_tokens: bool = False) -> None:
        self.w = worker
        self.interactive = interactive
        self.debug_tokens = debug_tokens
        self.session: Any = None
        if interactive:
            from prompt_toolkit import PromptSession

            self.session = PromptSession(message="you> ", bottom_toolbar=self._toolbar, refresh_interval=0.3)
            self.session.default_buffer.on_text_changed += self._on_text

    def _toolbar(self) -> str:
        s = self.w.status
        extra = f" | ready {s['typed_ready']} tok" if self.w.typeahead else ""
        if s.get("typeahead_error"):
            extra += f" | type-ahead stopped: {s['typeahead_error']}"
        return " " + status_line(s) + extra

    def _on_text(self, buf: Any) -> None:
        text = buf.text
        fixed = clean_text(text)
        if fixed != text:  # undecodable input bytes (surrogate escapes): show U+FFFD instead
            from prompt_toolkit.document import Document

            buf.document = Document(fixed, min(buf.cursor_position, len(fixed)))
            return  # the change calls us again with the clean text
        self.w.typed(text)

    def say(self, text: str, style: str = "") -> None:
        from rich.markup import escape

        (out if self.interactive else err).print(f"[{style}]{escape(text)}[/]" if style else text,
                                                 highlight=False, soft_wrap=True, markup=bool(style))

    def read(self) -> str | None:
        """The next line; None at end of input."""
        if self.session is None:
            raw = sys.stdin.buffer.readline()
            return None if not raw else raw.decode("utf-8", "replace").rstrip("\r\n")
        self.w.typed("")  # start with the turn's opening (the template's user header)
        try:
            return str(self.session.prompt())
        except KeyboardInterrupt:
            return ""
        except EOFError:
            return None

    def loop(self) -> None:
        while True:
            line = self.read()
            entered = time.perf_counter()
            if line is None:
                break
            line = clean_text(line)
            if not line.strip():
                continue
            try:
                if line.strip().startswith("/"):
                    if not self.command(line.strip()):
                        break
                    continue
                self.reply(line, entered)
            except KeyboardInterrupt:  # Ctrl-C outside a reply (a /command, a reply's last lines)
                self.say("[interrupted]", "yellow")

    def reply(self, text: str, entered: float) -> None:
        sink: queue.Queue[str] = queue.Queue()
        cancel = threading.Event()
        fut = self.w.turn(text, entered, sink, cancel)
        while True:
            try:
                try:
                    piece = sink.get(timeout=0.05)
                except queue.Empty:
                    if fut.done() and sink.empty():
                        break
                    continue
                sys.stdout.write(printable(piece))
                sys.stdout.flush()
            except KeyboardInterrupt:
                cancel.set()
        res = fut.result()
        if res.error:
            err.print(f"[red]error:[/] {res.error}", highlight=False, soft_wrap=True)
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        if res.stopped:
            self.say("[stopped]", "yellow")
        if self.debug_tokens:
            sys.stdout.write(f"[tokens ready={res.ready_tokens} prompt={res.prompt_tokens}] "
                             f"{' '.join(map(str, res.tokens))}\n")
            sys.stdout.flush()
        if self.interactive:
            ta = (f" | type-ahead had {res.ready_tokens} of {res.prompt_tokens} prompt tokens ready"
                  if self.w.typeahead else "")
            self.say(f"{status_line(self.w.status)} | first token {res.ttft_seconds:.3f} s{ta}", "dim")

    def command(self, line: str) -> bool:
        """Run a /command; False to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/exit", "/quit"):
                return False
            if name == "/help":
                self.say(HELP)
            elif name == "/reset":
                self.w.call(self.w.reset)
                self.say("new conversation", "green")
            elif name == "/budget":
                if arg:
                    b = self.w.call(lambda: self.w.set_budget(arg))
                    self.say(f"budget {human(b)}; resident now {human(self.w.status['resident_bytes'])} "
                             f"in {self.w.status['resident_leaves']} leaves", "green")
                else:
                    self.say(f"budget {human(self.w.status['budget_bytes'])}")
            elif name == "/typeahead":
                if arg not in ("on", "off"):
                    raise SmoeError("use /typeahead on or /typeahead off")
                self.w.typeahead = arg == "on"
                self.say(f"type-ahead {arg}", "green")
            elif name == "/stats":
                self.stats(as_json=arg == "json")
            else:
                self.say(f"unknown command {name}; /help lists them", "red")
        except SmoeError as e:
            err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return True

    def stats(self, as_json: bool) -> None:
        s = self.w.call(self.w.stats)
        if as_json:
            sys.stdout.write(json.dumps(s) + "\n")
            sys.stdout.flush()
            return
        from rich.table import Table

        last = s["last_turn"]
        table = Table(title="smoe-gguf chat", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")

        def mean(key: str, n: str) -> str:
            return f"{s[key]:.3f} s over {s[n]} turns" if s[key] is not None else "-"

        rows = [
            ("time to first token (last reply)", f"{last['ttft_seconds']:.3f} s"),
            ("  prompt tokens ready before Enter", f"{last['ready_tokens']} of {last['prompt_tokens']}"),
            ("  without type-ahead (estimate)", f"{s['ttft_without_typeahead_estimate']:.3f} s "
                                                f"(+{last['typeahead_seconds']:.3f} s to decode those tokens)"),
            ("mean, turns with type-ahead", mean("mean_ttft_with_typeahead", "turns_with_typeahead")),
            ("mean, turns without", mean("mean_ttft_without_typeahead", "turns_without_typeahead")),
            ("decode (last reply)", f"{last['decode_tps']:.1f} tok/s, {human(last['bytes_per_token'])} read/token"),
            ("X-Slot", f"{human(s['resident_bytes'])} in {s['resident_leaves']} leaves, budget {human(s['budget_bytes'])}"),
            ("hit rate", f"{s['hit_rate'] * 100:.1f}% ({s['hits']} hits, {s['misses']} misses, {s['evictions']} evictions)"),
            ("bytes read from shards", human(s["bytes_read"])),
            ("context", f"{s['n_past']} of {s['n_ctx']} tokens"),
        ]
        for k, v in rows:
            table.add_row(k, v)
        out.print(table)


def run_chat(model: Any, budget: str | None, system: str | None, policy: str, n_tokens: int, temp: float,
             seed: int, threads: int | None, ctx: int, checksums: str, typeahead: bool, debug_tokens: bool,
             io_depth: int = DEFAULT_IO_DEPTH) -> None:
    from .template import CHAT_UBATCH

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    with Engine(model, budget=budget, n_ctx=ctx, n_threads=threads, n_ubatch=CHAT_UBATCH, checksums=checksums,
                policy=policy, io_depth=io_depth) as eng:
        for w in getattr(eng, "warnings", []):
            err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
        if (hint := eng.prompt_hint(eng.n_ubatch + 1)) is not None:  # said once: it holds for every long prompt
            err.print(f"[yellow]hint:[/] {hint}", highlight=False, soft_wrap=True)
        template = ChatTemplate.of(eng.model)
        worker = ChatWorker(eng, template, system, n_tokens, temp, seed, typeahead and interactive)
        try:
            ui = ChatUI(worker, interactive, debug_tokens)
            ui.say(f"smoe-gguf chat: {model} | {template.name} | budget {human(eng.budget)} | "
                   f"context {eng.n_ctx} tokens | /help for commands, Ctrl-D to leave", "bold")
            ui.loop()
        finally:
            worker.close()
