"""Tools for the hostile-input tests: GGUF headers rewritten key by key, file snapshots, one-line
error checks, and the command line in a child process (where a hang or an abort must be caught)."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from smoe_gguf.gguf_layout import T_ARRAY, T_STRING, align_up, encode_kv, encode_string, read_layout

ROOT = Path(__file__).resolve().parents[1]


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every regular file under ``paths`` (files or directories), by path."""
    out: dict[str, str] = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and not x.is_symlink())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_error(result: tuple[int, str, str], expected_code: int, *needles: str) -> None:
    """The command's (exit code, stdout, stderr): it failed with ``expected_code``, one line on stderr
    holding every needle, no traceback."""
    code, _, stderr = result
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == expected_code, (code, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in lines if ln.startswith("error:") or ln.startswith("interrupted") or ln.startswith("terminated")]
    assert len(errors) == 1, stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


def _info_block_end(path: Path) -> tuple[int, int]:
    """(start, end) of the tensor-info block of a well-formed GGUF."""
    layout = read_layout(path)
    data = path.read_bytes()
    pos = layout.kv_end
    for _ in layout.tensors:
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    return layout.kv_end, pos


def rewrite_gguf(src: Path, dst: Path, *, kvs: dict[str, bytes | None] | None = None,
                 infos: bytes | None = None, n_tensors: int | None = None) -> Path:
    """Write ``src`` again with key/values replaced (``key: encoded kv``; None drops it, a new key
    is appended) and, optionally, another tensor-info block; the data section is kept and padded
    to the source's alignment."""
    layout = read_layout(src)
    data = src.read_bytes()
    blobs = {k: kv.raw for k, kv in layout.kvs.items()}
    for key, blob in (kvs or {}).items():
        if blob is None:
            blobs.pop(key, None)
        else:
            blobs[key] = blob
    start, end = _info_block_end(src)
    block = data[start:end] if infos is None else infos
    head = b"GGUF" + struct.pack("<IQQ", layout.version, len(layout.tensors) if n_tensors is None else n_tensors,
                                 len(blobs))
    head += b"".join(blobs.values()) + block
    head += b"\0" * (align_up(len(head), layout.alignment) - len(head))
    dst.write_bytes(head + data[layout.data_offset:])
    return dst


def kv(key: str, vtype: int, value: Any) -> bytes:
    return encode_kv(key, vtype, value)


def nested_array_kv(key: str, depth: int) -> bytes:
    """A key whose value is an array of arrays ``depth`` deep (GGUF readers refuse any nesting)."""
    body = struct.pack("<IQ", T_ARRAY, 1) * depth + struct.pack("<IQ", 4, 0)  # innermost: no uint32
    return encode_string(key) + struct.pack("<I", T_ARRAY) + body


def string_kv(key: str, value: str) -> bytes:
    return encode_kv(key, T_STRING, value)


def run_child(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
              stdin: str | None = None) -> tuple[int, str, str]:
    """`smoe-gguf ARGS` in a child process: (exit code, stdout, stderr); a hang fails the test."""
    proc = subprocess.run([sys.executable, "-c", "from smoe_gguf.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, input=stdin,
                          env={**os.environ, **(env or {})}, errors="replace")
    return proc.returncode, proc.stdout, proc.stderr
