"""Time to first token of `smoe-gguf chat` with and without type-ahead, for a typed prompt.

Drives the real chat in a pseudo-terminal (pexpect, as tests/test_chat.py does): types PROMPT at a
steady pace, presses Enter, reads `/stats json`. Every run is a fresh process with an empty profile
cache (cold X-Slot, nothing learned from earlier runs); the two modes alternate. For reference it
also times `smoe-gguf run --chat` (the same prefill in one go, the same micro-batches) and `run`
on the rendered prompt with its default 512-token micro-batch.

    .venv/bin/python scripts/ttft_typeahead.py PACK [--budget 25%] [--cps 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pexpect

PROMPT = ("Explain in plain words how a mixture of experts model chooses which experts to run for every "
          "token, why only a few of them are computed, and what happens when the memory cannot hold all of "
          "the experts at once.")  # 40 words
CPR = "\x1b[6n"


def chat(pack: str, budget: str, cps: float, typeahead: bool, n: int, extra: list[str]) -> dict[str, object]:
    env = {**os.environ, "TERM": "xterm-256color", "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="smoe-ttft-")}
    env.pop("PROMPT_TOOLKIT_NO_CPR", None)
    args = ["-m", "smoe_gguf.cli", "chat", pack, "--budget", budget, "-n", str(n), *extra]
    c = pexpect.spawn(sys.executable, args + ([] if typeahead else ["--no-typeahead"]), env=env,
                      dimensions=(24, 160), encoding="utf-8", codec_errors="replace", timeout=600)
    c.delaybeforesend = None

    def expect(pattern: str) -> None:
        while c.expect_exact([CPR, pattern]) == 0:
            c.send("\x1b[24;1R")

    expect("you>")
    for ch in PROMPT:
        c.send(ch)
        time.sleep(1 / cps)
    c.send("\r")
    expect("first token")
    expect("you>")
    c.send("/stats json\r")
    while c.expect([re.escape(CPR), r"(\{.*\})\r?\n"]) == 0:
        c.send("\x1b[24;1R")
    stats = json.loads(c.match.group(1))
    expect("you>")
    c.sendeof()
    c.expect(pexpect.EOF)
    return stats


def run(pack: str, budget: str, n: int, chat_template: bool, prompt: str, extra: list[str]) -> dict[str, object]:
    env = {**os.environ, "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="smoe-ttft-")}
    cmd = [sys.executable, "-m", "smoe_gguf.cli", "run", pack, "-p", prompt, "--budget", budget, "-n", str(n),
           "--json", *extra] + (["--chat"] if chat_template else [])
    return json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--cps", type=float, default=8.0, help="characters typed per second")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("-n", type=int, default=8, help="tokens per reply")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the commands' own)")
    a = ap.parse_args()
    extra = [] if a.threads is None else ["--threads", str(a.threads)]
    print(f"prompt: {len(PROMPT.split())} words, {len(PROMPT)} characters typed at {a.cps:g}/s; "
          f"budget {a.budget}; {a.pack}; threads {a.threads or 'default'}")
    rows: list[tuple[str, float, str]] = []
    for i in range(a.repeat):
        for typeahead in ((True, False) if i % 2 == 0 else (False, True)):
            s = chat(a.pack, a.budget, a.cps, typeahead, a.n, extra)
            last = s["last_turn"]
            assert isinstance(last, dict)
            label = "chat, type-ahead" if typeahead else "chat, --no-typeahead"
            rows.append((label, float(last["ttft_seconds"]),
                         f"{last['ready_tokens']} of {last['prompt_tokens']} prompt tokens ready before Enter"))
            print(f"  {rows[-1][0]:<24} {rows[-1][1]:7.3f} s  {rows[-1][2]}", flush=True)
    r = run(a.pack, a.budget, a.n, True, PROMPT, extra)
    print(f"  {'run --chat':<24} {r['ttft_seconds']:7.3f} s  {r['prompt_tokens']} tokens in micro-batches of "
          f"{r['n_ubatch']}")

    rendered = ("<|im_start|>user\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    r2 = run(a.pack, a.budget, a.n, False, rendered, extra)
    same = "as many tokens" if r2["prompt_tokens"] == r["prompt_tokens"] else "another token count"
    print(f"  {'run (no --chat)':<24} {r2['ttft_seconds']:7.3f} s  {r2['prompt_tokens']} tokens in micro-batches of "
          f"{r2['n_ubatch']} ({same}, ChatML written out)")
    for label in ("chat, type-ahead", "chat, --no-typeahead"):
        xs = [t for lab, t, _ in rows if lab == label]
        print(f"mean {label:<24} {sum(xs) / len(xs):7.3f} s over {len(xs)}")


if __name__ == "__main__":
    main()
