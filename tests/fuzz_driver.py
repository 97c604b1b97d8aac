"""Runs the fuzz cases of tests/test_fuzz.py in one child process, in-process through the CLI.

Usage: ``python -m tests.fuzz_driver CASES.json SECONDS``. For each case it prints a line
``{"start": id}``, runs the case's steps (`smoe-gguf` argument lists; a step with ``if_ok: i``
runs only if step ``i`` exited 0), then prints ``{"id": id, "results": [[code, stdout, stderr] |
null, ...]}``. A case that runs longer than SECONDS ends the process with the stacks of its
threads on stderr (faulthandler), so a hang or an abort is seen by the parent as a case started
and never finished.
"""

from __future__ import annotations

import faulthandler
import json
import sys

from tests.cli_helpers import run_cli


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    seconds = float(sys.argv[2])
    real_stdout = sys.stdout
    for case in cases:
        print(json.dumps({"start": case["id"]}), file=real_stdout, flush=True)
        faulthandler.dump_traceback_later(seconds, exit=True)
        results: list[list[object] | None] = []
        for step in case["steps"]:
            gate = step.get("if_ok")
            if gate is not None and (results[gate] is None or results[gate][0] != 0):  # type: ignore[index]
                results.append(None)
                continue
            code, out, err = run_cli(*step["args"])
            results.append([code, out[-20000:], err[-4000:]])
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps({"id": case["id"], "results": results}), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
