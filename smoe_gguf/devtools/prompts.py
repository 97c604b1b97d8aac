"""Benchmark prompts in the reference model's training domains (:mod:`smoe_gguf.devtools.refmodel`).

One prompt per domain (Python source, C headers, man pages, package documentation prose), each
short enough that it and 128 generated tokens fit the reference model's 256-token training
context. :data:`LEARN_PROMPTS` (for a tree-map learnt before a bench) are other text of the same
domains. :func:`long_c_prompt` builds a long prompt from the machine's C headers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DOMAIN_PROMPTS: dict[str, str] = {
    "python": (
        "import os\nimport stat\n\n\ndef walk_files(top, followlinks=False):\n"
        "    \"\"\"Yield the path of every regular file under top, directories first.\"\"\"\n"
        "    stack = [os.fspath(top)]\n    while stack:\n        path = stack.pop()\n"
        "        try:\n            entries = list(os.scandir(path))\n"
    ),
    "c": (
        "/* Declarations for the directory stream functions.\n   This file is part of the GNU C Library.  */\n\n"
        "#ifndef _DIRENT_H\n#define _DIRENT_H\t1\n\n#include <features.h>\n#include <bits/types.h>\n\n"
        "__BEGIN_DECLS\n\n/* This is the data type of directory stream objects.  */\n"
        "typedef struct __dirstream DIR;\n\n/* Open a directory stream on NAME.\n"
    ),
    "man": (
        "NAME\ncp - copy files and directories\nSYNOPSIS\ncp [OPTION]... [-T] SOURCE DEST\n"
        "DESCRIPTION\nCopy SOURCE to DEST, or multiple SOURCE(s) to DIRECTORY.\n"
        "Mandatory arguments to long options are mandatory for short options too.\n"
        "-a, --archive\nsame as -dR --preserve=all\n-b\n"
    ),
    "doc": (
        "This is the Debian prepackaged version of the GNU compression utility.\n\n"
        "The upstream sources were obtained from the project's release archive, and the package\n"
        "was first put together by a volunteer who has since handed it on. It is\n"
    ),
}

LEARN_PROMPTS: list[str] = [
    "def parse_header(line):\n    \"\"\"Split a header line into its name and value.\"\"\"\n    name, sep, value = ",
    "#include <stddef.h>\n\n/* Return the length of the string S.  */\nextern size_t strlen (const char *__s)",
    "NAME\nls - list directory contents\nSYNOPSIS\nls [OPTION]... [FILE]...\nDESCRIPTION\nList information",
    "This package is free software; you can redistribute it and/or modify it under the terms of",
    "class Queue:\n    def __init__(self, maxsize=0):\n        self.maxsize = maxsize\n",
    "README for the library\n\nTo build it, run the configure script and then make. The tests",
]

# Headers every Debian machine with a C library has, read in this order by long_c_prompt.
_C_HEADERS = ("stdio.h", "stdlib.h", "string.h", "unistd.h", "fcntl.h", "signal.h", "time.h", "dirent.h",
              "pthread.h", "errno.h", "ctype.h", "locale.h", "sys/stat.h", "sys/types.h", "sys/socket.h")


def long_c_prompt(count_tokens: Callable[[str], int], min_tokens: int, include: Path = Path("/usr/include")) -> str:
    """C header text of at least ``min_tokens`` tokens (as ``count_tokens`` counts them), whole
    lines, from the system's headers in a fixed order; "" when the headers are too few."""
    lines: list[str] = []
    for name in _C_HEADERS:
        try:
            lines += (include / name).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        except OSError:
            continue
        if count_tokens("".join(lines)) >= min_tokens:
            break
    else:
        if count_tokens("".join(lines)) < min_tokens:
            return ""
    lo, hi = 1, len(lines)  # the fewest whole lines that reach min_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens("".join(lines[:mid])) >= min_tokens:
            hi = mid
        else:
            lo = mid + 1
    return "".join(lines[:lo])
