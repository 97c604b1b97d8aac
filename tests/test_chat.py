"""`smoe-gguf chat`, tested as a person uses it: in a real pseudo-terminal, typing with pauses.

The replies are compared token for token with `smoe-gguf run --chat` on the same text (same
template, budget, seed, threads and context): type-ahead prefills the prompt in the micro-batches a
single prefill would use, so the two agree bit for bit.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import llama_cpp
import pexpect
import pytest

from smoe_gguf import template
from smoe_gguf.chat import ChatWorker, printable, segment_start, segments, status_line, tokenize_more
from smoe_gguf.engine import Engine
from smoe_gguf.pack.split import split
from smoe_gguf.template import ChatTemplate, Message, ReplyText, clean_text

from .cli_helpers import run_cli

N = 16  # tokens per reply
UB = 16  # chat micro-batch in these tests (default 64): more boundaries to roll back to, less to type
CTX = 512
COMMON = ["--budget", "25%", "-n", str(N), "--ctx", str(CTX), "--threads", "1"]  # no spinning helper thread
TOKENS = re.compile(r"\[tokens ready=(\d+) prompt=(\d+)\] ([\d ]*)\r?\n")
CPR = "\x1b[6n"  # prompt_toolkit asks the terminal where the cursor is; the test answers
PROMPT = "Hello there, how are you doing today? The quick brown fox jumps over the lazy dog."


@pytest.fixture(autouse=True)
def _chat_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMOE_CHAT_UBATCH", str(UB))  # `chat` in a terminal and `run` in-process agree
    monkeypatch.setattr(template, "CHAT_UBATCH", UB)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no leaf profile from other runs


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("chat") / "qwen3moe-f16.pack"
    split(tiny_model("qwen3moe", "f16"), out)
    return out


def run_tokens(pack: Path, text: str, *extra: str) -> list[int]:
    """What `smoe-gguf run --chat` answers to ``text``."""
    code, stdout, stderr = run_cli("run", str(pack), "--chat", "-p", text, *COMMON, *extra, "--json")
    assert code == 0, stderr
    return json.loads(stdout)["tokens"]


class Terminal:
    """`smoe-gguf chat` in a pseudo-terminal, driven key by key."""

    def __init__(self, pack: Path, *args: str, rows: int = 24, cols: int = 120) -> None:
        env = {**os.environ, "TERM": "xterm-256color"}
        env.pop("PROMPT_TOOLKIT_NO_CPR", None)
        self.rows = rows
        self.c = pexpect.spawn(sys.executable, ["-m", "smoe_gguf.cli", "chat", str(pack), *COMMON,
                                                "--debug-tokens", *args],
                               env=env, dimensions=(rows, cols), encoding="utf-8", codec_errors="replace",
                               timeout=60)
        self.c.delaybeforesend = None  # the test decides the pauses

    def expect(self, pattern: str | re.Pattern[str]) -> re.Match[str] | str:
        """Wait for ``pattern`` (a regex or exact text), answering cursor position requests."""
        while True:
            if isinstance(pattern, str):
                i = self.c.expect_exact([CPR, pattern])
            else:
                i = self.c.expect([re.compile(re.escape(CPR)), pattern])
            if i == 0:
                self.c.send(f"\x1b[{self.rows};1R")
                continue
            return self.c.match

    def prompt(self) -> None:
        self.expect("you>")

    def type(self, text: str, pause: float = 0.03) -> None:
        for ch in text:
            self.c.send(ch)
            time.sleep(pause)  # a person typing; results are awaited with expect(), never slept for

    def send_bytes(self, data: bytes) -> None:
        os.write(self.c.child_fd, data)

    def backspace(self, n: int, pause: float = 0.05) -> None:
        self.type("\x7f" * n, pause)

    def enter(self) -> tuple[int, int, list[int]]:
        """Press Enter; (prompt tokens ready before Enter, prompt tokens, reply token ids)."""
        self.c.send("\r")
        m = self.expect(TOKENS)
        assert isinstance(m, re.Match)
        return int(m.group(1)), int(m.group(2)), [int(t) for t in m.group(3).split()]

    def command(self, line: str, answer: str | re.Pattern[str]) -> re.Match[str] | str:
        self.prompt()
        self.type(line, 0.0)
        self.c.send("\r")
        return self.expect(answer)

    def quit(self) -> int:
        """Ctrl-D at the prompt: the exit status."""
        self.prompt()
        self.c.sendeof()
        self.c.expect(pexpect.EOF)
        self.c.close()
        return int(self.c.exitstatus if self.c.exitstatus is not None else -1)


# ------------------------------------------------------------------------------- in a terminal


def test_typed_prompt_is_prefilled_while_typing_and_matches_run(pack: Path) -> None:
    sampling = ["--system", "You are terse.", "--temp", "0.8", "--seed", "7"]
    t = Terminal(pack, *sampling)
    try:
        t.prompt()
        t.expect(re.compile(r"X-Slot \S+ \S+/\S+ \S+ \(\d+%\) \| \d+ leaves \| hit"))  # the live status line
        t.type(PROMPT)
        ready, n_prompt, tokens = t.enter()
        assert tokens == run_tokens(pack, PROMPT, *sampling)
        assert tokens != run_tokens(pack, PROMPT, *sampling[:-1], "8")  # the seed matters: a real check
        assert ready > 0, "type-ahead prefilled nothing before Enter"
        assert ready < n_prompt  # the word being typed and the template's tail wait for Enter
        stats = t.command("/stats json", re.compile(r"(\{.*\})\r?\n"))
        assert isinstance(stats, re.Match)
        s = json.loads(stats.group(1))
        assert s["last_turn"]["ready_tokens"] == ready and s["last_turn"]["prompt_tokens"] == n_prompt
        assert s["ttft_without_typeahead_estimate"] >= s["last_turn"]["ttft_seconds"] > 0
        assert s["resident_bytes"] <= s["budget_bytes"]
        assert t.quit() == 0
    finally:
        t.c.close(force=True)


def test_deleting_and_retyping_rolls_back_and_still_matches_run(pack: Path) -> None:
    t = Terminal(pack)
    try:
        t.prompt()
        t.type("Hello there, how are you doing todya")
        t.backspace(2)
        t.type("ay? The quikc")
        t.backspace(3)
        t.type("ick brown cat")
        t.backspace(len(" brown cat"))  # back across a whole word: prefilled tokens are rolled back
        t.type(" brown fox jumps over the lazy dog.")
        ready, n_prompt, tokens = t.enter()
        assert tokens == run_tokens(pack, PROMPT)
        assert 0 < ready < n_prompt
        # A second turn continues the conversation without prefilling it again.
        t.prompt()
        t.type("And then what happened?")
        ready2, n_prompt2, tokens2 = t.enter()
        assert len(tokens2) > 0 and n_prompt2 < n_prompt  # only the new turn was prefilled
        assert t.quit() == 0
    finally:
        t.c.close(force=True)


def test_bad_input_keeps_the_chat_going(pack: Path) -> None:
    t = Terminal(pack, "--ctx", "256")
    try:
        t.prompt()
        t.c.send("\r")  # an empty line: ignored
        t.command("/help", "/budget")
        t.command("/nope", "unknown command")
        # A paste longer than the context: a clear message, nothing sent, the chat goes on.
        t.prompt()
        t.c.send("word " * 400)
        t.c.send("\r")
        t.expect("too long")
        # Invalid UTF-8 typed in the terminal becomes U+FFFD, as `run` sees it.
        t.prompt()
        t.type("caf")
        t.send_bytes(b"\xe9 cr\xffme")  # not UTF-8
        t.type(" and the terminal is resized while I type")
        t.c.setwinsize(30, 90)
        t.rows = 30
        t.type(", still fine.")
        _ready, _n, tokens = t.enter()
        assert tokens == run_tokens(pack, "caf\ufffd cr\ufffdme and the terminal is resized while I type, still fine.",
                                    "--ctx", "256")
        # The budget changes live; shrinking evicts at once.
        t.command("/budget 100%", "budget")
        m = t.command("/budget 25%", re.compile(r"budget ([\d.]+ \w+); resident now ([\d.]+ \w+)"))
        assert isinstance(m, re.Match) and _bytes(m.group(2)) <= _bytes(m.group(1))
        t.command("/budget 1", "below the minimum")
        t.command("/reset", "new conversation")
        assert t.quit() == 0
    finally:
        t.c.close(force=True)


def test_ctrl_c_stops_a_reply_and_keeps_the_chat(pack: Path) -> None:
    # Greedy decoding of this prompt runs for 430 tokens before its end-of-generation token.
    t = Terminal(pack, "-n", "400", "--ctx", "1024")
    try:
        t.prompt()
        t.type("Once upon a time", 0.0)
        t.c.send("\r")
        t.expect("\x1b[?2004l")  # prompt_toolkit has left the line: the reply streams next
        t.c.expect(r"[^\s]{3}")  # some of it has come
        t.c.sendintr()
        t.expect("[stopped]")
        m = t.expect(TOKENS)
        assert isinstance(m, re.Match) and 0 < len(m.group(3).split()) < 400
        t.prompt()
        t.type("Hi", 0.0)
        _r, _n, tokens = t.enter()  # still chatting
        assert tokens
        assert t.quit() == 0
    finally:
        t.c.close(force=True)


def test_without_a_terminal_lines_are_read_and_closed_stdin_exits_cleanly(pack: Path) -> None:
    cmd = [sys.executable, "-m", "smoe_gguf.cli", "chat", str(pack), *COMMON, "--debug-tokens"]
    r = subprocess.run(cmd, input=b"", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = f"{PROMPT}\n\n/stats\n".encode() + b"caf\xe9!\n"
    r = subprocess.run(cmd, input=lines, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    replies = TOKENS.findall(r.stdout.decode("utf-8", "replace"))
    assert len(replies) == 2
    assert [int(x) for x in replies[0][2].split()] == run_tokens(pack, PROMPT)
    assert int(replies[0][0]) == 0  # nothing to type ahead from a pipe


# ------------------------------------------------------------------------------- the parts


def test_model_template_and_plain_fallback(pack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine(pack, budget="100%", n_ctx=CTX, n_threads=1) as eng:
        t = ChatTemplate.of(eng.model)
        assert t.template is not None and t.stop_text is None
        msgs = [Message("system", "Be brief."), Message("user", "Hi")]
        assert t.render(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                  "<|im_start|>assistant\n")
        assert t.typed_prefix(msgs[:1], "Hel") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHel"
        monkeypatch.setattr(llama_cpp, "llama_model_chat_template", lambda model, name: b"{{ unknown }}")
        assert ChatTemplate.of(eng.model).template is None  # llama.cpp cannot render it: fallback
        monkeypatch.setattr(llama_cpp, "llama_model_chat_template", lambda model, name: None)
        plain = ChatTemplate.of(eng.model)
    assert plain.template is None and "no chat template" in plain.name
    convo = [*msgs, Message("assistant", " Hello!"), Message("user", "Bye")]
    assert plain.render(convo) == "Be brief.\n\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"
    assert plain.typed_prefix(msgs[:1], "By") == "Be brief.\n\nUser: By"


def test_plain_fallback_chat_keeps_earlier_turns_in_the_kv_cache(pack: Path) -> None:
    with Engine(pack, budget="25%", n_ctx=CTX, n_threads=1, n_ubatch=UB) as eng:
        w = ChatWorker(eng, ChatTemplate(None, "test"), "Be brief.", n_tokens=12)
        try:
            first = _turn(w, "What is the capital of France?")
            assert eng.tokenize(w.template.render(w.messages[:2])) == w.kv[: first.prompt_tokens]
            kv = list(w.kv)
            second = _turn(w, "And of Italy?")
            assert w.kv[: len(kv)] == kv  # the first turn stayed in the KV cache, as generated
            new = w.template.render(w.messages[:4])[len(w.template.reply_end(w.messages[:3]) or "") :]
            assert new == "\nUser: And of Italy?\nAssistant:"
            assert second.prompt_tokens == len(tokenize_more(eng, new)) + 1  # + the last reply token
            assert first.tokens and second.tokens
        finally:
            w.close()


def test_typeahead_worker_rolls_back_to_micro_batch_boundaries(pack: Path) -> None:
    with Engine(pack, budget="25%", n_ctx=CTX, n_threads=1, n_ubatch=UB) as eng:
        w = ChatWorker(eng, ChatTemplate.of(eng.model), None, n_tokens=N)
        try:
            for text in (PROMPT, PROMPT[:20] + "xyz abc def ghi", PROMPT):
                w.typed(text)
                w.wait_idle()
                assert len(w.kv) % eng.n_ubatch == 0
                assert w.kv == w._stable(text)[: len(w.kv)]
            whole = len(w._stable(PROMPT)) // eng.n_ubatch * eng.n_ubatch  # whole micro-batches
            res = _turn(w, PROMPT)
            assert res.ready_tokens == whole > 0
        finally:
            w.close()
    assert res.tokens == run_tokens(pack, PROMPT)


def test_micro_batch_layout_and_small_helpers() -> None:
    assert segments(0, 0, 40, 16, 512) == [(0, 16), (16, 32), (32, 40)]
    assert segments(0, 500, 530, 16, 512) == [(500, 512), (512, 528), (528, 530)]  # n_batch chunks restart
    assert segments(7, 7, 30, 16, 512) == [(7, 23), (23, 30)]
    assert segment_start(0, 37, 16, 512) == 32 and segment_start(7, 37, 16, 512) == 23
    r = ReplyText("\nUser:")
    assert r.add(b"Hi \xc3") == "Hi "  # half a UTF-8 character waits
    assert r.add(b"\xa9\n") == "\u00e9"  # a newline may start the stop text: held back
    assert r.add(b"Us") == ""
    assert r.add(b"er: more") == "" and r.stopped and r.text == "Hi \u00e9"
    assert clean_text("caf\udce9\x00") == "caf\ufffd"
    assert printable("a\x1b[2Jb\n") == "a\ufffd[2Jb\n"
    line = status_line({"resident_bytes": 512, "budget_bytes": 1024, "resident_leaves": 3, "hit_rate": 0.5,
                        "decode_tps": 12.5, "bytes_per_token": 2048, "n_past": 10, "n_ctx": 512})
    assert "50%" in line and "3 leaves" in line and "12.5 tok/s" in line and "2.00 KiB/tok" in line


def _turn(w: ChatWorker, text: str):  # noqa: ANN202
    res = w.turn(text, time.perf_counter(), queue.Queue(), threading.Event()).result()
    assert res.error is None, res.error
    return res


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _bytes(text: str) -> float:
    num, unit = text.split()
    return float(num) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
