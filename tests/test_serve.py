"""`smoe-gguf serve`, tested over HTTP on loopback with the official `openai` package and httpx.

Most tests share one server (in this process, on a free port) over a tiny test model. Replies are
compared with `smoe-gguf run --chat` on the same text, seed and temperature: the server prefills
every prompt in the micro-batches `run --chat` uses, whatever the KV cache kept, so the two agree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from smoe_gguf import template
from smoe_gguf.engine import Engine
from smoe_gguf.pack.split import split
from smoe_gguf.serve import Service, bind, create_app, make_server, url_of

from .cli_helpers import run_cli

UB = 16  # chat micro-batch in these tests (default 64): prefixes long enough to reuse stay short
CTX = 1024
N = 12  # reply tokens
KEY = "test-key"
QUEUE = 8
MAX_BODY = 64 * 1024
MODEL = "tiny-moe"
SYSTEM = "You are a terse assistant. Answer in one short sentence, and never ask a question back."
PROMPTS = [f"Question {i}: what is the colour of the sky at {i} o'clock?" for i in range(8)]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("serve") / "qwen3moe-f16.pack"
    split(tiny_model("qwen3moe", "f16"), out)
    return out


@pytest.fixture(scope="module")
def ubatch() -> Iterator[int]:
    """The chat micro-batch, for the server and for `run --chat` alike."""
    mp = pytest.MonkeyPatch()
    mp.setattr(template, "CHAT_UBATCH", UB)
    yield UB
    mp.undo()


class Running:
    """The server in this process: uvicorn in a thread, on a free loopback port."""

    def __init__(self, pack: Path) -> None:
        self.eng = Engine(pack, n_ctx=CTX, n_threads=1, n_ubatch=template.CHAT_UBATCH)
        self.svc = Service(self.eng, MODEL, QUEUE, default_max_tokens=N)
        sock = bind("127.0.0.1", 0)  # listening already: clients may connect before uvicorn runs
        self.url = url_of(sock)
        self.server = make_server(create_app(self.svc, KEY, MAX_BODY), self.svc)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

    def post(self, path: str, body: Any = None, content: bytes | None = None,
             headers: dict[str, str] | None = None) -> httpx.Response:
        h = {"Authorization": f"Bearer {KEY}", **(headers or {})}
        return httpx.post(self.url + path, json=body, content=content, headers=h, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(smoe_\w+) (\S+)$", text, re.M)}

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.svc.close()
        self.eng.close()


@pytest.fixture(scope="module")
def srv(pack: Path, ubatch: int) -> Iterator[Running]:
    r = Running(pack)
    try:
        yield r
    finally:
        r.close()


def run_chat(pack: Path, user: str, temp: float = 0.0, seed: int = 0, system: str | None = None,
             n: int = N) -> dict[str, Any]:
    """What `smoe-gguf run --chat --json` answers."""
    args = ["run", str(pack), "--chat", "-p", user, "-n", str(n), "--ctx", str(CTX), "--threads", "1",
            "--temp", str(temp), "--seed", str(seed), "--json"]
    code, stdout, stderr = run_cli(*args, *(["--system", system] if system else []))
    assert code == 0, stderr
    return json.loads(stdout)


def reply_text(eng: Engine, tokens: list[int]) -> tuple[str, str]:
    """(the reply's text, its finish reason) for the tokens `run` generated (an EOG token ends it)."""
    ended = bool(tokens) and eng.is_eog(tokens[-1])
    text = b"".join(eng.token_piece(t) for t in (tokens[:-1] if ended else tokens))
    return text.decode("utf-8", "replace"), "stop" if ended else "length"


def chat_messages(user: str, system: str | None = SYSTEM) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


# ------------------------------------------------------------------------------- answers


@pytest.mark.parametrize(("temp", "seed"), [(0.0, 0), (0.9, 1234)])
def test_openai_client_gets_the_tokens_of_run_chat(srv: Running, pack: Path, temp: float, seed: int) -> None:
    want = run_chat(pack, PROMPTS[0], temp, seed, SYSTEM)
    text, finish = reply_text(srv.eng, want["tokens"])
    client = srv.client()
    got = client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPTS[0]),  # type: ignore[arg-type]
                                         max_tokens=N, temperature=temp, seed=seed)
    assert got.choices[0].message.content == text
    assert got.choices[0].finish_reason == finish
    assert got.usage is not None
    assert got.usage.prompt_tokens == want["prompt_tokens"]
    assert got.usage.completion_tokens == len(want["tokens"])
    assert got.model == MODEL and got.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=MODEL, messages=chat_messages(PROMPTS[0]),  # type: ignore[arg-type]
                                                 max_tokens=N, temperature=temp, seed=seed, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(want["tokens"])


def test_completions_endpoint_matches_run(srv: Running, pack: Path) -> None:
    prompt = "The sky is"  # one micro-batch: `run` (without --chat) prefills it alike
    code, stdout, stderr = run_cli("run", str(pack), "-p", prompt, "-n", str(N), "--ctx", str(CTX),
                                   "--threads", "1", "--json")
    assert code == 0, stderr
    text, finish = reply_text(srv.eng, json.loads(stdout)["tokens"])
    got = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    assert got.choices[0].text == text and got.choices[0].finish_reason == finish
    streamed = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_stop_sequences_cut_the_reply(srv: Running, pack: Path) -> None:
    text, _ = reply_text(srv.eng, run_chat(pack, PROMPTS[1], system=SYSTEM)["tokens"])
    stop = text[4:7]
    assert len(stop) == 3, "the reference reply is too short for this test"
    got = srv.client().chat.completions.create(model=MODEL, messages=chat_messages(PROMPTS[1]),  # type: ignore[arg-type]
                                               max_tokens=N, temperature=0, stop=[stop, "\x00never"])
    assert got.choices[0].message.content == text[: text.find(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_eight_concurrent_clients_each_get_their_own_answer(srv: Running, pack: Path) -> None:
    want = [reply_text(srv.eng, run_chat(pack, p, system=SYSTEM)["tokens"])[0] for p in PROMPTS]
    client = srv.client()

    def ask(i: int) -> str:
        kw: dict[str, Any] = {"model": MODEL, "messages": chat_messages(PROMPTS[i]), "max_tokens": N, "temperature": 0}
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == want


def test_a_client_leaving_mid_stream_frees_the_engine_at_the_next_token(
        srv: Running, pack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text, _ = reply_text(srv.eng, run_chat(pack, PROMPTS[2], system=SYSTEM)["tokens"])
    stream = srv.eng.stream
    asked_second = threading.Event()
    pulled: list[int] = []

    def held_stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        """The engine's stream, paused before its second token until the client has gone."""
        job = srv.svc.current
        assert job is not None
        steps = stream(*args, **kwargs)
        try:
            for i, step in enumerate(steps):
                if i == 1:
                    asked_second.set()
                    assert job.cancel.wait(60), "the server never noticed the client leaving"
                pulled.append(step.token)
                yield step
        finally:
            steps.close()

    monkeypatch.setattr(srv.eng, "stream", held_stream)
    before = srv.metrics()
    body = {"model": MODEL, "messages": chat_messages(PROMPTS[3]), "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        with client.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: closing this iterator would close the response
            assert next(lines).startswith("data: ")  # the first chunk: the request is being answered
            assert asked_second.wait(60)
    # The client is gone: its generation stopped at the token after the one being waited for.
    monkeypatch.setattr(srv.eng, "stream", stream)
    got = srv.client().chat.completions.create(model=MODEL, messages=chat_messages(PROMPTS[2]),  # type: ignore[arg-type]
                                               max_tokens=N, temperature=0)
    assert len(pulled) == 2
    assert got.choices[0].message.content == text
    after = srv.metrics()
    assert after["smoe_requests_cancelled_total"] == before["smoe_requests_cancelled_total"] + 1


def test_second_turn_prefills_only_the_new_tokens(srv: Running) -> None:
    client = srv.client()
    first_msgs = chat_messages("Tell me about the sea, in a few words, please.")
    first = client.chat.completions.create(model=MODEL, messages=first_msgs, max_tokens=N, temperature=0)  # type: ignore[arg-type]
    reply = first.choices[0].message.content or ""
    second_msgs = [*first_msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": "And the sky?"}]
    before = srv.metrics()
    second = client.chat.completions.create(model=MODEL, messages=second_msgs, max_tokens=N, temperature=0)  # type: ignore[arg-type]
    after = srv.metrics()

    tmpl = srv.svc.template
    p1 = srv.eng.tokenize(tmpl.render([template.Message(m["role"], m["content"]) for m in first_msgs]))
    p2 = srv.eng.tokenize(tmpl.render([template.Message(m["role"], m["content"]) for m in second_msgs]))
    common = next((i for i, (a, b) in enumerate(zip(p1, p2)) if a != b), min(len(p1), len(p2)))
    assert second.usage is not None and second.usage.prompt_tokens == len(p2)
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    # Kept: the first prompt's whole micro-batches that the second one starts with; the rest of
    # the first prompt's last micro-batch and the reply are decoded again with the new turn.
    assert cached == min(common, len(p1)) // UB * UB
    assert cached >= len(p1) - UB > 0
    assert len(p2) - cached < (len(p2) - len(p1)) + UB
    assert after["smoe_prompt_tokens_reused_total"] - before["smoe_prompt_tokens_reused_total"] == cached
    assert after["smoe_prompt_tokens_prefilled_total"] - before["smoe_prompt_tokens_prefilled_total"] == len(p2) - cached

    # The same turn with nothing reused gives the same reply.
    client.chat.completions.create(model=MODEL, messages=chat_messages("Something else.", "Other system."),  # type: ignore[arg-type]
                                   max_tokens=2, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=second_msgs, max_tokens=N, temperature=0)  # type: ignore[arg-type]
    assert again.usage is not None and again.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    assert again.choices[0].message.content == second.choices[0].message.content
    assert again.usage.completion_tokens == second.usage.completion_tokens


# ------------------------------------------------------------------------------- refusals

GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD: list[tuple[str, Any, int, str | None]] = [
    ("malformed JSON", b'{"messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("no messages", {"max_tokens": 2}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("message not an object", {"messages": ["hi"]}, 400, "messages[0]"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("max_tokens a string", {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("temperature a string", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("temperature a bool", {**GOOD, "temperature": True}, 400, "temperature"),
    ("top_p out of range", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("seed a float", {**GOOD, "seed": 1.5}, 400, "seed"),
    ("stop a number", {**GOOD, "stop": 5}, 400, "stop"),
    ("stream a string", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("n above one", {**GOOD, "n": 2}, 400, "n"),
    ("unknown model", {**GOOD, "model": "gpt-4o"}, 404, "model"),
    ("model not a string", {**GOOD, "model": 3}, 400, "model"),
    ("prompt longer than the context", {"messages": [{"role": "user", "content": "hello " * 2 * CTX}]}, 400, "messages"),
    ("oversized body", {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}, 413, None),
]


@pytest.mark.parametrize(("what", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_their_4xx(srv: Running, what: str, body: Any, status: int, param: str | None) -> None:
    r = srv.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}) \
        if isinstance(body, bytes) else srv.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if what == "prompt longer than the context":
        assert err["code"] == "context_length_exceeded"


def test_bad_input_through_the_openai_package_and_other_endpoints(srv: Running) -> None:
    client = srv.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=chat_messages("hi"), max_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert srv.post("/v1/completions", {"prompt": 3}).status_code == 400
    assert srv.post("/v1/completions", {"max_tokens": 2}).status_code == 400
    assert srv.post("/v1/completions", {"prompt": ""}).status_code == 400
    r = httpx.get(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(srv.url + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    assert srv.post("/v1/chat/completions", GOOD).status_code == 200  # and the server still answers


def test_api_key_is_required_but_not_for_health(srv: Running) -> None:
    assert httpx.post(srv.url + "/v1/chat/completions", json=GOOD).status_code == 401
    r = httpx.post(srv.url + "/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(srv.url + "/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    assert [m.id for m in srv.client().models.list()] == [MODEL]


def test_a_full_queue_answers_503_with_retry_after(srv: Running) -> None:
    held = threading.Event()
    try:
        srv.svc.submit(held.wait)  # the worker is busy until the test lets it go
        for _ in range(QUEUE):
            srv.svc.submit(lambda: None)  # and the queue is full
        r = srv.post("/v1/chat/completions", GOOD)
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.InternalServerError):
            srv.client().chat.completions.create(model=MODEL, messages=chat_messages("hi"), max_tokens=2)  # type: ignore[arg-type]
    finally:
        held.set()
    assert srv.post("/v1/chat/completions", GOOD).status_code == 200
    assert srv.metrics()["smoe_requests_rejected_total"] >= 2


def test_metrics_and_health(srv: Running) -> None:
    srv.post("/v1/chat/completions", GOOD)
    m = srv.metrics()
    for name in ("hit_rate", "bytes_read_total", "stall_seconds_total", "budget_bytes", "resident_bytes",
                 "tokens_generated_total", "prompt_tokens_prefilled_total", "prompt_tokens_reused_total"):
        assert f"smoe_{name}" in m
    assert m["smoe_budget_bytes"] == srv.eng.budget and 0 <= m["smoe_hit_rate"] <= 1
    assert m["smoe_tokens_generated_total"] > 0 and m["smoe_resident_bytes"] > 0
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'smoe_requests_total{endpoint="/v1/chat/completions",code="200"}' in text


def test_stop_text_holds_back_a_possible_stop_sequence() -> None:
    r = template.ReplyText(["\nUser:", "END"])
    assert r.add(b"Hi \xc3") == "Hi "  # half a UTF-8 character waits
    assert r.add(b"\xa9 E") == "\u00e9 "  # "E" may start "END"
    assert r.add(b"ND more") == "" and r.stopped and r.text == "Hi \u00e9 "
    r = template.ReplyText(["xyz"])
    assert r.add(b"abcx") == "abc" and r.add(b"q") == "xq" and r.finish() == ""


# ------------------------------------------------------------------------------- the command


def test_serve_help() -> None:
    code, stdout, _ = run_cli("serve", "--help")
    assert code == 0
    for opt in ("--budget", "--host", "--port", "--api-key", "--ctx", "--threads", "--policy", "--queue"):
        assert opt in stdout


def test_serve_with_defaults_answers_and_stops_cleanly_on_ctrl_c(pack: Path) -> None:
    """`serve PACK` with no budget (a free port, so as not to depend on 8080 being free)."""
    proc = subprocess.Popen([sys.executable, "-m", "smoe_gguf.cli", "serve", str(pack), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "SMOE_API_KEY": ""})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # warnings may come first
            if m := re.search(r"serving (\S+) at (http://127\.0\.0\.1:\d+)/v1 .* budget", line):
                break
        else:
            pytest.fail("the server exited before it was ready")
        assert m[1] == pack.name
        url = m[2]
        r = httpx.post(url + "/v1/chat/completions", json=GOOD, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert '"POST /v1/chat/completions" 200' in rest  # one log line per request
    assert "Traceback" not in rest and rest.rstrip().endswith("stopped")
