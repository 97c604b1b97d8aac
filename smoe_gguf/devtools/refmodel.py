"""A reference qwen3moe model whose routing is real, trained here from text on the machine.

Everything the model needs is built locally, without downloads:

- **corpus** (:func:`collect_corpus`): documents in four labelled domains found on any Debian
  machine with Python: ``python`` (the standard library's source), ``c`` (``/usr/include``
  headers), ``man`` (English man pages, troff crudely stripped), ``doc`` (``/usr/share/doc``
  READMEs, changelogs, copyright files...). Files are taken in the order of a hash of their
  path until a byte budget per domain is reached; a document goes to the held-out split by a
  hash of its path. Same machine, same arguments -> same corpus.
- **tokenizer** (:class:`Tokenizer`, :func:`train_tokenizer`): byte-level BPE trained in pure
  Python, exported as a llama.cpp ``gpt2`` tokenizer with ``tokenizer.ggml.pre = "qwen2"``.
  :func:`pretokenize` is an exact port of llama.cpp's qwen2 pre-tokenizer
  (``unicode_regex_split_custom_qwen2``), so llama.cpp splits text as the trainer did; the
  letter/number classes come from Python's ``unicodedata`` (llama.cpp has its own, newer Unicode
  tables: code points assigned after Python's Unicode version may be classed differently).
- **model**: weights are a dict of numpy/torch arrays keyed by GGUF tensor name, in numpy order
  (the ggml shape reversed). :func:`torch_forward` (training) and :func:`numpy_forward`
  (reference without torch) compute exactly llama.cpp's qwen3moe graph: RMSNorm, GQA attention
  with per-head q/k RMSNorm, NEOX RoPE, softmax router -> top-k -> weights renormalised over the
  top-k (``build_moe_ffn`` with ``norm_w``), SwiGLU experts, untied output head.
- **training** (:func:`train`): AdamW, cross-entropy plus a Switch-style load-balancing loss,
  domain-balanced batches, a fixed seed; the train/held-out loss curve is recorded.
- **export** (:func:`write_gguf`): arch ``qwen3moe``, F16 or F32 matrices, F32 norms and router,
  written atomically.
- **llama.cpp side**: :func:`llama_logits` (logits of every position), :class:`RouterProbe` /
  :func:`llama_router_probs` (each layer's router probabilities, read at ``ffn_moe_probs-<layer>``
  through ``cb_eval``), :func:`compare_with_llama` (llama.cpp against the training framework),
  :func:`route_stats` / :func:`summarise_routes` (routing entropy per domain, domain/expert mutual
  information, per-layer LRU hit rates code vs prose).

torch is needed only for training (``pip install -e '.[reference]'``); it is imported lazily.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import heapq
import json
import math
import os
import re
import sysconfig
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from smoe_gguf.devtools.testmodels import CHAT_TEMPLATE, SPECIAL_TOKENS, Shape, add_hparams, bytes_to_unicode
from smoe_gguf.errors import SmoeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DOMAINS: tuple[str, ...] = ("python", "c", "man", "doc")
CODE_DOMAINS: tuple[str, ...] = ("python", "c")
PROSE_DOMAINS: tuple[str, ...] = ("man", "doc")
ARCH = "qwen3moe"
RMS_EPS = 1e-6
ROPE_BASE = 10000.0
# llama.cpp clamps the sum of the top-k weights to the smallest normal F16 before dividing.
WEIGHT_SUM_MIN = 6.103515625e-5

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


# =============================================================================================
# Corpus
# =============================================================================================


@dataclass(frozen=True)
class Document:
    domain: str
    source: str  # path of the file it came from
    text: str
    heldout: bool


@dataclass(frozen=True)
class CorpusSpec:
    """Where documents are looked for and how much is taken."""

    bytes_per_domain: int = 3_000_000
    max_doc_bytes: int = 32_000  # a document is cut (at a line end) to at most this many bytes
    heldout_percent: int = 10
    python_root: str = ""  # default: sysconfig's stdlib
    include_root: str = "/usr/include"
    man_root: str = "/usr/share/man"
    doc_root: str = "/usr/share/doc"

    def roots(self) -> dict[str, Path]:
        return {
            "python": Path(self.python_root or sysconfig.get_paths()["stdlib"]),
            "c": Path(self.include_root),
            "man": Path(self.man_root),
            "doc": Path(self.doc_root),
        }


_DOC_NAME = re.compile(
    r"^(readme|news|changelog|changes|copyright|authors|thanks|todo|contributing|faq|history|bugs|"
    r"install|usage|notes)([._-].*)?$|\.(txt|md|rst)(\.gz)?$",
    re.IGNORECASE,
)


def _candidate_files(domain: str, root: Path) -> list[Path]:
    """Files of a domain under ``root``, regular files only (no symlinks), any order."""
    if not root.is_dir():
        return []
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages")]
        rel = Path(dirpath).relative_to(root)
        if domain == "man" and (not rel.parts or not rel.parts[0].startswith("man")):
            if rel.parts:  # translated pages live in man/<lang>/manN: keep English only
                dirnames[:] = []
            continue
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            if domain == "python" and name.endswith(".py"):
                out.append(p)
            elif domain == "c" and name.endswith(".h"):
                out.append(p)
            elif domain == "man" and name.endswith(".gz"):
                out.append(p)
            elif domain == "doc" and _DOC_NAME.search(name):
                out.append(p)
    return out


# Families of near-identical files are capped so that no one dominates a domain: the man pages
# of one program suite (16k ``gcloud_*`` pages on a cloud image), copies of one header for
# several architectures, the files of one documentation directory.
_MAX_PER_FAMILY: dict[str, int] = {"python": 1_000_000, "c": 2, "man": 25, "doc": 4}


def _family(domain: str, rel: str) -> str:
    parts = rel.split("/")
    if domain == "man":
        return re.split(r"[_.-]", parts[-1], maxsplit=1)[0]
    if domain == "c":
        return parts[-1]
    if domain == "doc":
        return parts[0]
    return rel


def _path_hash(domain: str, rel: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{domain}:{rel}".encode()).digest()[:8], "big")


_TROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "TH", "Nm", "Nd",
                      "Ar", "Fl", "Op", "It", "Pa", "Xr", "Sh", "Ss", "Dl", "Em", "Sy", "Li", "Va", "Fn",
                      "Ft", "Fa", "Cm", "Ev", "Er", "Dv", "Ic", "Ql", "Dq", "Sq", "Pq", "IP", "TP", "UR",
                      "MT", "Ns"}
_TROFF_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}  # fonts alternate, no spaces between arguments
_TROFF_ARG = re.compile(r'"([^"]*)"?|(\S+)')
_TROFF_ESCAPE = re.compile(r"\\(f(\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(\(..|\[[^\]]*\]|.)|\((..)|\[([^\]]*)\]|.)")
_TROFF_CHARS = {"em": "--", "en": "-", "hy": "-", "bu": "*", "co": "(c)", "aq": "'", "dq": '"', "oq": "'",
                "cq": "'", "lq": '"', "rq": '"', "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "mi": "-",
                "Fo": "<<", "Fc": ">>", "fo": "<", "fc": ">", "at": "@", "sh": "#", "Do": "$", "ba": "|",
                "bv": "|", "br": "|", "ul": "_", "pl": "+", "eq": "=", "<=": "<=", ">=": ">=", "->": "->",
                "<-": "<-", "tm": "(tm)", "rg": "(R)", "de": " degrees", "mu": "x", "di": "/"}


def _troff_escape(m: re.Match[str]) -> str:
    s = m.group(1)
    if s[0] in "fs*":
        return ""
    if s[0] == "(":
        return _TROFF_CHARS.get(m.group(4), "")
    if s[0] == "[":
        return _TROFF_CHARS.get(m.group(5), "")
    return {"-": "-", "e": "\\", "\\": "\\", "&": "", "|": "", "^": "", "0": " ", "~": " ", " ": " ",
            "c": "", "%": "", "'": "'", "`": "`", ".": "."}.get(s, "")


def strip_troff(src: str) -> str:
    """Crude troff/man/mdoc -> text: comments and layout requests dropped, text macros' arguments
    kept, font/size/char escapes replaced."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in _TROFF_TEXT_MACROS:
                continue
            args = [a or b for a, b in _TROFF_ARG.findall(parts[1] if len(parts) > 1 else "")]
            if parts[0] == "IP":  # tag, then an indent width
                args = args[:1]
            elif parts[0] == "TP":  # an indent width; the tag is the next line
                args = []
            line = ("" if parts[0] in _TROFF_ALTERNATING else " ").join(args)
        line = _TROFF_ESCAPE.sub(_troff_escape, line)
        if line.strip():
            out.append(line.rstrip())
    return "\n".join(out) + "\n"


def _read_text(path: Path, limit: int) -> str | None:
    """A file's text (gunzipped), or None when it is empty or looks binary."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(limit * 4)
        else:
            with open(path, "rb") as f:
                data = f.read(limit * 4)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not data or b"\0" in data:
        return None
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") > len(text) // 100:
        return None
    return text


def _cut(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = data[:max_bytes]
    nl = cut.rfind(b"\n")
    if nl > max_bytes // 2:
        cut = cut[: nl + 1]
    return cut.decode("utf-8", errors="ignore")


def _doc_text(domain: str, path: Path, spec: CorpusSpec) -> str | None:
    raw = _read_text(path, spec.max_doc_bytes * (4 if domain == "man" else 1))
    if raw is None:
        return None
    text = strip_troff(raw) if domain == "man" else raw
    text = text.replace("\r\n", "\n")
    text = _cut(text, spec.max_doc_bytes)
    return text if len(text.strip()) >= 64 else None


def collect_domain(domain: str, spec: CorpusSpec) -> list[Document]:
    """The documents of one domain: files in path-hash order until ``bytes_per_domain``, exact
    duplicates dropped, at most ``_MAX_PER_FAMILY`` files of one family."""
    root = spec.roots()[domain]
    files = _candidate_files(domain, root)
    keyed = sorted((_path_hash(domain, p.relative_to(root).as_posix()), p) for p in files)
    docs: list[Document] = []
    seen: set[bytes] = set()
    families: Counter[str] = Counter()
    total = 0
    for h, p in keyed:
        if total >= spec.bytes_per_domain:
            break
        fam = _family(domain, p.relative_to(root).as_posix())
        if families[fam] >= _MAX_PER_FAMILY[domain]:
            continue
        text = _doc_text(domain, p, spec)
        if text is None:
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        families[fam] += 1
        heldout = (h >> 8) % 100 < spec.heldout_percent
        docs.append(Document(domain, str(p), text, heldout))
        total += len(text.encode())
    return docs


def collect_corpus(spec: CorpusSpec = CorpusSpec()) -> list[Document]:
    """All domains' documents (domain order, then path-hash order)."""
    return [d for domain in DOMAINS for d in collect_domain(domain, spec)]


def corpus_digest(docs: Sequence[Document]) -> str:
    """sha256 over (domain, split, source, text) of every document, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.domain}\0{int(d.heldout)}\0{d.source}\0".encode())
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()


def corpus_summary(docs: Sequence[Document]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for d in docs:
        s = out.setdefault(d.domain, {"train_docs": 0, "train_bytes": 0, "heldout_docs": 0, "heldout_bytes": 0})
        split = "heldout" if d.heldout else "train"
        s[f"{split}_docs"] += 1
        s[f"{split}_bytes"] += len(d.text.encode())
    return out


# =============================================================================================
# Tokenizer: llama.cpp's qwen2 pre-tokenizer, byte-level BPE
# =============================================================================================

# llama.cpp's \s (unicode_set_whitespace in src/unicode-data.cpp), not Python's.
LLAMA_WHITESPACE: tuple[int, ...] = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                     0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
PRE_TOKENIZER = "qwen2"


def _class_ranges(pred: Callable[[int], bool]) -> str:
    """A regex character-class body (no brackets) for the code points where ``pred`` holds."""
    parts: list[str] = []
    start = -1
    for cp in range(0x110001):
        inside = cp <= 0x10FFFF and pred(cp)
        if inside and start < 0:
            start = cp
        elif not inside and start >= 0:
            end = cp - 1
            parts.append(_esc(start) if start == end else f"{_esc(start)}-{_esc(end)}")
            start = -1
    return "".join(parts)


def _esc(cp: int) -> str:
    return f"\\U{cp:08x}"


_PRETOKENIZE_RE: re.Pattern[str] | None = None


def _pretokenize_re() -> re.Pattern[str]:
    """The qwen2 split as a Python regex over explicit classes (see :func:`pretokenize`)."""
    global _PRETOKENIZE_RE
    if _PRETOKENIZE_RE is None:
        cat = unicodedata.category
        letter = _class_ranges(lambda c: cat(chr(c))[0] == "L")
        number = _class_ranges(lambda c: cat(chr(c))[0] == "N")
        space = "".join(_esc(c) for c in LLAMA_WHITESPACE)
        pattern = (
            r"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])"
            rf"|[^\r\n{letter}{number}]?[{letter}]+"
            rf"|[{number}]"
            rf"| ?[^{space}{letter}{number}]+[\r\n]*"
            rf"|[{space}]*[\r\n]+"
            rf"|[{space}]+(?![^{space}])"
            rf"|[{space}]+"
            r"|."
        )
        _PRETOKENIZE_RE = re.compile(pattern, re.DOTALL)
    return _PRETOKENIZE_RE


def pretokenize(text: str) -> list[str]:
    """Split ``text`` exactly as llama.cpp's ``unicode_regex_split_custom_qwen2`` does.

    That function is a hand-written scanner for the regex
    ``(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|
    \\s*[\\r\\n]+|\\s+(?!\\S)|\\s+``; the same alternatives in the same order, with ``\\s`` being
    llama.cpp's whitespace set, reproduce it (including ``\\s+(?!\\S)`` leaving the last space of
    a run to the next word, and a run at the end of the text staying whole).
    """
    return _pretokenize_re().findall(text)


_B2U: dict[int, str] = bytes_to_unicode()
_U2B: dict[str, int] = {u: b for b, u in _B2U.items()}
_B2U_TABLE: list[str] = [_B2U[b] for b in range(256)]


def byte_encode(word: str) -> str:
    """GPT-2's reversible bytes -> printable characters mapping of a word's UTF-8 bytes."""
    return "".join(_B2U_TABLE[b] for b in word.encode("utf-8"))


@dataclass
class Tokenizer:
    """Byte-level BPE: ``tokens[:256]`` are the bytes (GPT-2 mapping), then merge results, then
    the special tokens. ``merges`` in rank order."""

    tokens: list[str]
    merges: list[tuple[str, str]]
    specials: dict[str, int]
    _ranks: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)
    _ids: dict[str, int] = field(default_factory=dict, repr=False)
    _cache: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _special_re: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ranks = {m: i for i, m in enumerate(self.merges)}
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)))

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def eot(self) -> int:
        return self.specials["<|endoftext|>"]

    def token_types(self) -> list[int]:
        special = set(self.specials.values())
        return [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(self.n_vocab)]

    def _bpe(self, word: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        sym = list(byte_encode(word))
        ranks = self._ranks
        while len(sym) > 1:
            best_rank, best = None, None
            for pair in zip(sym, sym[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            sym = _merge_pair(sym, best)
        ids = tuple(self._ids[s] for s in sym)
        if len(self._cache) < 500_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, as ``llama_tokenize(..., add_special=True, parse_special)`` gives
        them for this vocabulary (no BOS is added: ``add_bos_token`` is false)."""
        out: list[int] = []
        pieces = [text]
        if parse_special:
            pieces = []
            pos = 0
            for m in self._special_re.finditer(text):
                pieces += [text[pos:m.start()], m.group()]
                pos = m.end()
            pieces.append(text[pos:])
        for piece in pieces:
            if parse_special and piece in self.specials:
                out.append(self.specials[piece])
                continue
            for word in pretokenize(piece):
                out.extend(self._bpe(word))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        inv = {v: k for k, v in self.specials.items()}
        data = bytearray()
        for i in ids:
            if i in inv:
                data += inv[i].encode()
            else:
                data += bytes(_U2B[c] for c in self.tokens[i])
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "merges": [f"{a} {b}" for a, b in self.merges], "specials": self.specials}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Tokenizer:
        merges = [tuple(m.split(" ", 1)) for m in obj["merges"]]
        return cls(list(obj["tokens"]), merges, dict(obj["specials"]))  # type: ignore[arg-type]

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        r = gguf.GGUFReader(path)
        tokens = [str(bytes(r.fields["tokenizer.ggml.tokens"].parts[i]), "utf-8")
                  for i in r.fields["tokenizer.ggml.tokens"].data]
        f = r.fields["tokenizer.ggml.merges"]
        merges = [tuple(str(bytes(f.parts[i]), "utf-8").split(" ", 1)) for i in f.data]
        t = r.fields["tokenizer.ggml.token_type"]
        types = [int(t.parts[i][0]) for i in t.data]
        specials = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == int(gguf.TokenType.CONTROL)}
        return cls(tokens, merges, specials)  # type: ignore[arg-type]


def _merge_pair(sym: list[str], pair: tuple[str, str]) -> list[str]:
    a, b = pair
    out: list[str] = []
    i, n = 0, len(sym)
    while i < n:
        if i + 1 < n and sym[i] == a and sym[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(sym[i])
            i += 1
    return out


def word_counts(texts: Iterator[str] | Sequence[str]) -> Counter[str]:
    """Pre-tokenized words of ``texts`` (byte-encoded) and how often each occurs."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pretokenize(text))
    return Counter({byte_encode(w): n for w, n in counts.items()})


def learn_bpe(counts: Counter[str] | dict[str, int], n_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """Byte-level BPE merges from word counts, incrementally (only words holding the merged pair
    are recounted). Ties go to the smallest pair (as strings): deterministic."""
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pair_count: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, sym in enumerate(words):
        for pair in zip(sym, sym[1:]):
            pair_count[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, p) for p, n in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale entry: the pair's count changed after it was pushed
        if -neg < min_count:
            break
        merges.append(pair)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            sym = words[i]
            for p in zip(sym, sym[1:]):
                pair_count[p] -= freq[i]
                changed.add(p)
                s = where.get(p)
                if s is not None and p != pair:
                    s.discard(i)
            sym = _merge_pair(sym, pair)
            words[i] = sym
            for p in zip(sym, sym[1:]):
                pair_count[p] += freq[i]
                changed.add(p)
                where.setdefault(p, set()).add(i)
        pair_count.pop(pair, None)
        for p in changed:
            n = pair_count.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p))
            else:
                pair_count.pop(p, None)
    return merges


def build_tokenizer(merges: Sequence[tuple[str, str]], n_vocab: int | None = None) -> Tokenizer:
    """256 byte tokens, merge results (a result already in the vocabulary is not repeated;
    merges stop once ``n_vocab`` minus the specials is reached), then the special tokens."""
    tokens = list(_B2U_TABLE)
    seen = set(tokens)
    kept: list[tuple[str, str]] = []
    limit = (n_vocab - len(SPECIAL_TOKENS)) if n_vocab else None
    for a, b in merges:
        if limit is not None and len(tokens) >= limit:
            break
        kept.append((a, b))
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    specials = {}
    for s in SPECIAL_TOKENS:
        specials[s] = len(tokens)
        tokens.append(s)
    return Tokenizer(tokens, kept, specials)


def train_tokenizer(texts: Sequence[str], n_vocab: int) -> Tokenizer:
    """A byte-level BPE of ``n_vocab`` tokens (bytes + merges + specials) trained on ``texts``."""
    counts = word_counts(texts)
    # a few extra merges: one whose result already exists does not add a token
    merges = learn_bpe(counts, n_vocab - 256 - len(SPECIAL_TOKENS) + 64)
    return build_tokenizer(merges, n_vocab)


# =============================================================================================
# Model: shape, weights, numpy forward
# =============================================================================================


@dataclass(frozen=True)
class ModelConfig:
    n_vocab: int
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_expert: int = 32
    n_used: int = 4
    n_ff_exp: int = 128
    n_ctx_train: int = 256

    def shape(self) -> Shape:
        return Shape(n_layer=self.n_layer, n_expert=self.n_expert, n_used=self.n_used, n_embd=self.n_embd,
                     n_ff_exp=self.n_ff_exp, n_head=self.n_head, n_head_kv=self.n_head_kv,
                     head_dim=self.head_dim, n_ctx_train=self.n_ctx_train)


Weights = dict[str, np.ndarray]


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model in GGUF order, numpy shapes (the ggml shape reversed)."""
    d, q, kv, e, ff = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_expert, cfg.n_ff_exp
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.n_vocab, d)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": (d,),
            p + "attn_q.weight": (q, d),
            p + "attn_k.weight": (kv, d),
            p + "attn_v.weight": (kv, d),
            p + "attn_output.weight": (d, q),
            p + "attn_q_norm.weight": (cfg.head_dim,),
            p + "attn_k_norm.weight": (cfg.head_dim,),
            p + "ffn_norm.weight": (d,),
            p + "ffn_gate_inp.weight": (e, d),
            p + "ffn_gate_exps.weight": (e, ff, d),
            p + "ffn_up_exps.weight": (e, ff, d),
            p + "ffn_down_exps.weight": (e, d, ff),
        })
    out["output_norm.weight"] = (d,)
    out["output.weight"] = (cfg.n_vocab, d)
    return out


def is_f32_tensor(name: str) -> bool:
    """Norms and the router stay F32 in the GGUF (as llama.cpp's converter writes them)."""
    return name.endswith("norm.weight") or ".ffn_gate_inp." in name


def init_weights(cfg: ModelConfig, seed: int, std: float = 0.02) -> Weights:
    """Seeded initial weights: norms 1, matrices normal(0, std), residual outputs (attention
    output, expert down) scaled by 1/sqrt(2 n_layer)."""
    out: Weights = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, dtype=np.float32)
            continue
        digest = hashlib.sha256(name.encode()).digest()
        rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
        s = std / math.sqrt(2 * cfg.n_layer) if name.endswith(("attn_output.weight", "ffn_down_exps.weight")) else std
        out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(s)).astype(np.float32)
    return out


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    shapes = tensor_shapes(cfg)
    total = sum(int(np.prod(s)) for s in shapes.values())
    experts = sum(int(np.prod(s)) for n, s in shapes.items() if "_exps." in n)
    per_expert_layer = 3 * cfg.n_embd * cfg.n_ff_exp
    active = total - experts + cfg.n_layer * cfg.n_used * per_expert_layer
    return {"total": total, "experts": experts, "dense_core": total - experts, "active_per_token": active}


def rope_tables(n_pos: int, head_dim: int, base: float = ROPE_BASE) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [n_pos, head_dim/2] of NEOX RoPE (theta_j = pos * base^(-2j/head_dim))."""
    half = head_dim // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    theta = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def _np_rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + RMS_EPS) * w).astype(np.float32)


def _np_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, hd]; NEOX: rotate (x[:hd/2], x[hd/2:]) pairs."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def np_route(h: np.ndarray, router: np.ndarray, n_used: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs [T, E], selected [T, k] by descending prob, weights [T, k]) as build_moe_ffn computes
    them for qwen3moe: softmax, top-k, weights renormalised over the top-k."""
    logits = h @ router.T
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    sel = np.argsort(-p, axis=-1, kind="stable")[:, :n_used]
    w = np.take_along_axis(p, sel, axis=-1)
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), WEIGHT_SUM_MIN)
    return p, sel, w


def numpy_forward(w: Weights, cfg: ModelConfig, ids: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [T, n_vocab] of one sequence (positions 0..T-1) and each layer's selected experts
    [T, k]: the reference forward without torch (float32, norms in float64)."""
    ids_a = np.asarray(ids, dtype=np.int64)
    t = len(ids_a)
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    cos, sin = rope_tables(t, hd)
    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), k=1)
    x = w["token_embd.weight"][ids_a].astype(np.float32)
    routes: list[np.ndarray] = []
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        h = _np_rms(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "attn_q.weight"].T).reshape(t, nh, hd)
        k = (h @ w[p + "attn_k.weight"].T).reshape(t, nkv, hd)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, nkv, hd)
        q = _np_rope(_np_rms(q, w[p + "attn_q_norm.weight"]), cos, sin)
        k = _np_rope(_np_rms(k, w[p + "attn_k_norm.weight"]), cos, sin)
        att = np.empty((t, nh, hd), dtype=np.float32)
        for hh in range(nh):
            kvh = hh // (nh // nkv)
            s = (q[:, hh, :] @ k[:, kvh, :].T) / np.float32(math.sqrt(hd)) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            att[:, hh, :] = s @ v[:, kvh, :]
        x = x + att.reshape(t, nh * hd) @ w[p + "attn_output.weight"].T
        h = _np_rms(x, w[p + "ffn_norm.weight"])
        _, sel, wt = np_route(h, w[p + "ffn_gate_inp.weight"], cfg.n_used)
        routes.append(sel)
        moe = np.zeros_like(h)
        for e in np.unique(sel):
            rows, slot = np.nonzero(sel == e)
            he = h[rows]
            g = he @ w[p + "ffn_gate_exps.weight"][e].T
            u = he @ w[p + "ffn_up_exps.weight"][e].T
            y = (g / (1.0 + np.exp(-g)) * u) @ w[p + "ffn_down_exps.weight"][e].T
            moe[rows] += y * wt[rows, slot][:, None]
        x = x + moe
    x = _np_rms(x, w["output_norm.weight"])
    return x @ w["output.weight"].T, routes


# =============================================================================================
# GGUF export
# =============================================================================================


def _temp_path(dst: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=suffix, dir=dst.parent)
    os.close(fd)
    return Path(name)


def export_array(name: str, a: np.ndarray, dtype: str) -> np.ndarray:
    """The array as it is stored in the GGUF: F32 for norms/router, else ``dtype``."""
    if is_f32_tensor(name) or dtype == "f32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "f16":
        return np.ascontiguousarray(a, dtype=np.float16)
    raise SmoeError(f"unknown dtype {dtype!r}; choose f16 or f32")


def write_gguf(path: str | os.PathLike[str], cfg: ModelConfig, weights: Weights, tok: Tokenizer,
               dtype: str = "f16", name: str = "smoe reference qwen3moe",
               extra: dict[str, str] | None = None) -> Path:
    """Write a qwen3moe GGUF atomically (temporary file in the same directory, then rename)."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    if tok.n_vocab != cfg.n_vocab:
        raise SmoeError(f"tokenizer has {tok.n_vocab} tokens but the model {cfg.n_vocab}")
    for n, s in shapes.items():
        if n not in weights or tuple(weights[n].shape) != s:
            raise SmoeError(f"tensor {n}: expected shape {s}, got {None if n not in weights else weights[n].shape}")
    tmp = _temp_path(dst, ".part")
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            w.add_name(name)
            w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
            add_hparams(w, ARCH, cfg.shape())
            _add_tokenizer(w, tok)
            for k, v in (extra or {}).items():
                w.add_string(k, v)
            for n in shapes:
                w.add_tensor(n, export_array(n, weights[n], dtype))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.flush()
        finally:
            w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types())
    w.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    w.add_bos_token_id(tok.specials["<|endoftext|>"])
    w.add_eos_token_id(tok.specials["<|im_end|>"])
    w.add_pad_token_id(tok.specials["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def read_gguf_weights(path: str | os.PathLike[str]) -> tuple[ModelConfig, Weights]:
    """The config and float32 weights of a GGUF written by :func:`write_gguf`."""
    r = gguf.GGUFReader(path)

    def u32(key: str) -> int:
        return int(r.fields[f"{ARCH}.{key}"].parts[-1][0])

    n_vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    cfg = ModelConfig(n_vocab=n_vocab, n_layer=u32("block_count"), n_embd=u32("embedding_length"),
                      n_head=u32("attention.head_count"), n_head_kv=u32("attention.head_count_kv"),
                      head_dim=u32("attention.key_length"), n_expert=u32("expert_count"),
                      n_used=u32("expert_used_count"), n_ff_exp=u32("expert_feed_forward_length"),
                      n_ctx_train=u32("context_length"))
    weights = {t.name: np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
               for t in r.tensors}
    return cfg, weights


# =============================================================================================
# llama.cpp side: logits of every position, router probabilities
# =============================================================================================


def _llama() -> Any:
    import llama_cpp

    return llama_cpp


def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(_llama().__file__).resolve().parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


_PROBS_NODE = re.compile(rb"ffn_moe_probs-(\d+)")


class RouterProbe:
    """A ``cb_eval`` that reads ``ffn_moe_probs-<layer>`` (softmax router output, [n_expert,
    n_tokens] F32, contiguous) of every layer. Keep the object alive with the context."""

    def __init__(self, n_expert: int) -> None:
        llama_cpp = _llama()
        self.n_expert = n_expert
        self.lib = _ggml_base()
        self.probs: dict[int, list[np.ndarray]] = {}
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t: int, ask: bool, _user: int | None) -> bool:
        try:
            name = self.lib.ggml_get_name(t) or b""
            m = _PROBS_NODE.fullmatch(name)  # not its views: "ffn_moe_probs-0 (reshaped)"
            if m is None:
                return False if ask else True
            if ask:
                return True
            nbytes = int(self.lib.ggml_nbytes(t))
            buf = np.empty(nbytes // 4, dtype=np.float32)
            self.lib.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
            self.probs.setdefault(int(m.group(1)), []).append(buf.reshape(-1, self.n_expert))
            return True
        except BaseException as e:  # noqa: BLE001 - never unwind into C
            self.error = e
            return False

    def take(self) -> list[np.ndarray]:
        """Per layer, the probabilities [n_tokens, n_expert] of everything decoded since the last take."""
        if self.error is not None:
            raise SmoeError(f"router probe failed: {self.error!r}")
        out = [np.concatenate(self.probs[i]) for i in sorted(self.probs)]
        self.probs = {}
        return out


@dataclass
class LlamaRunner:
    """A llama.cpp model + context that decodes token sequences from position 0 and returns the
    logits of every position (and, with ``probe_experts``, every layer's router probabilities)."""

    model_path: Path
    n_ctx: int = 512
    n_threads: int = 2
    f32_kv: bool = True
    probe_experts: int = 0  # n_expert of the model to read the router's output, 0: off

    def __post_init__(self) -> None:
        from smoe_gguf.devtools import stock

        llama_cpp = _llama()
        self._stock = stock
        self.model = stock.load_model(self.model_path, stock.model_params())
        self.probe = RouterProbe(self.probe_experts) if self.probe_experts else None
        cp = stock.context_params(n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=self.n_ctx, n_ubatch=self.n_ctx)
        if self.f32_kv:  # F32 K/V cache and no flash attention: attention in F32 end to end
            cp.type_k = 0
            cp.type_v = 0
            cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if self.probe is not None:
            cp.cb_eval = self.probe.callback
        try:
            self.ctx = stock.new_context(self.model, cp)
        except BaseException:
            llama_cpp.llama_model_free(self.model)
            raise
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def logits(self, ids: Sequence[int], all_positions: bool = True) -> np.ndarray:
        """Logits [len(ids), n_vocab] of ``ids`` decoded as one batch from position 0 (only the
        last position's, [1, n_vocab], unless ``all_positions``)."""
        llama_cpp = _llama()
        n = len(ids)
        if not 0 < n <= self.n_ctx:
            raise SmoeError(f"{n} tokens do not fit n_ctx={self.n_ctx}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(ids):
                batch.token[i] = int(tok)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_positions or i == n - 1 else 0
            batch.n_tokens = n
            self._stock.LOG.clear()
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise SmoeError(f"llama_decode failed (code {rc}): {self._stock.LOG.reason() or 'no reason given'}")
            rows = range(n) if all_positions else [n - 1]
            out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
            for j, i in enumerate(rows):
                out[j] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            return out
        finally:
            llama_cpp.llama_batch_free(batch)

    def close(self) -> None:
        llama_cpp = _llama()
        if getattr(self, "ctx", None):
            self._stock.free_context(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def llama_logits(model_path: str | os.PathLike[str], ids: Sequence[int], f32_kv: bool = True,
                 n_threads: int = 2) -> np.ndarray:
    """Logits [len(ids), n_vocab] from stock llama.cpp for ``ids`` from position 0."""
    with LlamaRunner(Path(model_path), n_ctx=max(32, len(ids)), n_threads=n_threads, f32_kv=f32_kv) as r:
        return r.logits(ids)


def logits_match(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Figures comparing two [T, V] logit arrays."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "ref_logit_std": float(ref.std()),
        "max_rel_diff": float(diff.max() / max(float(np.abs(ref).max()), 1e-12)),
        "argmax_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
        "n_positions": int(ref.shape[0]),
    }


# =============================================================================================
# torch: forward, training
# =============================================================================================


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise SmoeError("training the reference model needs torch: pip install -e '.[reference]'") from e
    return torch


def torch_weights(w: Weights) -> dict[str, torch.Tensor]:
    torch = _torch()
    return {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in w.items()}


def numpy_weights(p: dict[str, torch.Tensor]) -> Weights:
    return {n: t.detach().cpu().float().numpy().copy() for n, t in p.items()}


def _t_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    torch = _torch()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w


def _t_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd], cos/sin [T, hd/2]."""
    torch = _torch()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _t_moe(h: torch.Tensor, p: dict[str, torch.Tensor], pre: str, cfg: ModelConfig
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [N, D] -> (moe output [N, D], load-balancing loss, selected experts [N, k])."""
    torch = _torch()
    n, e, k = h.shape[0], cfg.n_expert, cfg.n_used
    probs = torch.softmax(h @ p[pre + "ffn_gate_inp.weight"].T, dim=-1)
    topw, topi = probs.topk(k, dim=-1)
    topw = topw / topw.sum(-1, keepdim=True).clamp_min(WEIGHT_SUM_MIN)
    flat = topi.reshape(-1)
    counts = torch.bincount(flat, minlength=e)
    # Switch-Transformer balance: E * sum_e (share of routed slots) * (mean router prob)
    aux = e * torch.sum(counts.to(probs.dtype) / (n * k) * probs.mean(0))
    # Rows grouped by expert: one gather, per-expert matmuls on contiguous chunks, one scatter.
    # The expert matrices are taken with unbind (not ``gate[ex]``): indexing a parameter makes
    # autograd build a zero gradient of the whole [E, ...] tensor for every expert it touches.
    order = torch.argsort(flat, stable=True)
    tok = order // k
    wsorted = topw.reshape(-1)[order]
    sizes = counts.tolist()
    chunks = h.index_select(0, tok).split(sizes)
    gates = p[pre + "ffn_gate_exps.weight"].unbind(0)
    ups = p[pre + "ffn_up_exps.weight"].unbind(0)
    downs = p[pre + "ffn_down_exps.weight"].unbind(0)
    ys = [(torch.nn.functional.silu(he @ gates[ex].T) * (he @ ups[ex].T)) @ downs[ex].T
          for ex, he in enumerate(chunks) if sizes[ex]]
    y = torch.cat(ys) * wsorted[:, None]
    out = torch.zeros_like(h).index_add(0, tok, y)
    return out, aux, topi


def torch_forward(p: dict[str, torch.Tensor], cfg: ModelConfig, ids: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """ids [B, T] -> (logits [B, T, V], mean load-balancing loss, per-layer selected experts [B*T, k])."""
    torch = _torch()
    F = torch.nn.functional
    b, t = ids.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    cos_np, sin_np = rope_tables(t, hd)
    cos, sin = torch.from_numpy(cos_np), torch.from_numpy(sin_np)
    x = p["token_embd.weight"][ids]
    aux_total = x.new_zeros(())
    routes: list[torch.Tensor] = []
    for il in range(cfg.n_layer):
        pre = f"blk.{il}."
        h = _t_rms(x, p[pre + "attn_norm.weight"])
        q = (h @ p[pre + "attn_q.weight"].T).view(b, t, nh, hd)
        k = (h @ p[pre + "attn_k.weight"].T).view(b, t, nkv, hd)
        v = (h @ p[pre + "attn_v.weight"].T).view(b, t, nkv, hd)
        q = _t_rope(_t_rms(q, p[pre + "attn_q_norm.weight"]).transpose(1, 2), cos, sin)
        k = _t_rope(_t_rms(k, p[pre + "attn_k_norm.weight"]).transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        x = x + att.transpose(1, 2).reshape(b, t, nh * hd) @ p[pre + "attn_output.weight"].T
        h = _t_rms(x, p[pre + "ffn_norm.weight"]).reshape(b * t, -1)
        moe, aux, sel = _t_moe(h, p, pre, cfg)
        aux_total = aux_total + aux
        routes.append(sel)
        x = x + moe.view(b, t, -1)
    x = _t_rms(x, p["output_norm.weight"])
    return x @ p["output.weight"].T, aux_total / cfg.n_layer, routes


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600  # at most this many optimizer steps
    batch: int = 8  # sequences per step, spread evenly over the domains
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    aux_coef: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_windows: int = 8  # held-out windows per domain, evenly spaced over its held-out stream
    seed: int = 0
    threads: int = 2
    # 0: train exactly ``steps`` steps. Otherwise also a wall-clock horizon: the learning-rate
    # schedule runs on progress = max(step / steps, seconds / max_seconds) and training ends when
    # progress reaches 1, so a slow machine ends early with a finished (decayed) schedule.
    max_seconds: float = 0.0


@dataclass
class TokenStreams:
    """Per domain: the token ids of all train / held-out documents, each followed by <|endoftext|>."""

    train: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]


def tokenize_corpus(docs: Sequence[Document], tok: Tokenizer) -> TokenStreams:
    train: dict[str, list[int]] = {d: [] for d in DOMAINS}
    held: dict[str, list[int]] = {d: [] for d in DOMAINS}
    for d in docs:
        dst = held if d.heldout else train
        dst[d.domain].extend(tok.encode(d.text, parse_special=False))
        dst[d.domain].append(tok.eot)
    arr = lambda m: {k: np.asarray(v, dtype=np.int32) for k, v in m.items() if v}  # noqa: E731
    return TokenStreams(arr(train), arr(held))


def heldout_windows(streams: TokenStreams, n_windows: int, length: int) -> dict[str, np.ndarray]:
    """Per domain, up to ``n_windows`` non-overlapping windows [n, length] evenly spaced over its
    held-out stream (so they span several documents)."""
    out: dict[str, np.ndarray] = {}
    for dom, s in streams.heldout.items():
        n = min(n_windows, len(s) // length)
        if n:
            starts = np.linspace(0, len(s) - length, n).astype(np.int64)
            out[dom] = np.stack([s[a:a + length] for a in starts]).astype(np.int64)
    return out


def sample_batch(streams: TokenStreams, rng: np.random.Generator, batch: int, length: int
                 ) -> tuple[np.ndarray, list[str]]:
    """[batch, length] windows, domains in turn, offsets uniformly at random; and each row's domain."""
    doms = [d for d in DOMAINS if d in streams.train and len(streams.train[d]) > length]
    if not doms:
        raise SmoeError(f"no domain has more than {length} training tokens")
    rows, labels = [], []
    for i in range(batch):
        dom = doms[i % len(doms)]
        s = streams.train[dom]
        off = int(rng.integers(0, len(s) - length))
        rows.append(s[off:off + length])
        labels.append(dom)
    return np.stack(rows).astype(np.int64), labels


def _progress(step: int, seconds: float, tc: TrainConfig) -> float:
    p = step / max(1, tc.steps)
    if tc.max_seconds > 0:
        p = max(p, seconds / tc.max_seconds)
    return p


def _lr_at(step: int, progress: float, tc: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, times a cosine from 1 to ``min_lr_ratio`` over progress."""
    warm = min(1.0, (step + 1) / max(1, tc.warmup))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * warm * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cos)


def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each row: logits [B, T, V], targets [B, T] -> [B]."""
    torch = _torch()
    b, t, v = logits.shape
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), reduction="none")
    return ce.view(b, t).mean(-1)


def evaluate(p: dict[str, torch.Tensor], cfg: ModelConfig, windows: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) per domain on fixed held-out windows, and their mean."""
    torch = _torch()
    out: dict[str, float] = {}
    with torch.no_grad():
        for dom, win in windows.items():
            ids = torch.from_numpy(win)
            logits, _, _ = torch_forward(p, cfg, ids[:, :-1])
            out[dom] = float(_cross_entropy_rows(logits, ids[:, 1:]).mean())
    out["all"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


@dataclass
class TrainResult:
    weights: Weights
    curve: list[dict[str, Any]]
    seconds: float
    steps_done: int
    tokens_seen: int
    stopped_by: str  # "steps" or "time"


def train(cfg: ModelConfig, tc: TrainConfig, streams: TokenStreams, log: Log = _quiet,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train from :func:`init_weights` (seed ``tc.seed``). Every ``eval_every`` steps and at the
    end a point of the loss curve is recorded: train loss (mean of the steps since the last
    point, overall and per domain), load-balancing loss, held-out loss per domain.
    ``on_step(step, progress)`` is called after every step (progress in [0, 1])."""
    torch = _torch()
    torch.manual_seed(tc.seed)
    torch.set_num_threads(max(1, tc.threads))
    p = torch_weights(init_weights(cfg, tc.seed))
    decay = [t for t in p.values() if t.ndim >= 2]
    no_decay = [t for t in p.values() if t.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(tc.seed)
    windows = heldout_windows(streams, tc.eval_windows, tc.seq_len + 1)
    curve: list[dict[str, Any]] = []
    recent: list[tuple[float, float, dict[str, float]]] = []
    t0 = time.monotonic()
    step = 0
    while True:
        progress = _progress(step, time.monotonic() - t0, tc)
        if progress >= 1.0:
            break
        lr = _lr_at(step, progress, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        batch, labels = sample_batch(streams, rng, tc.batch, tc.seq_len + 1)
        ids = torch.from_numpy(batch)
        logits, aux, _ = torch_forward(p, cfg, ids[:, :-1])
        rows = _cross_entropy_rows(logits, ids[:, 1:])
        ce = rows.mean()
        loss = ce + tc.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), tc.grad_clip)
        opt.step()
        step += 1
        by_dom: dict[str, list[float]] = {}
        for dom, v in zip(labels, rows.detach().tolist()):
            by_dom.setdefault(dom, []).append(v)
        recent.append((float(ce.detach()), float(aux.detach()), {d: float(np.mean(v)) for d, v in by_dom.items()}))
        if step % tc.eval_every == 0:
            curve.append(_curve_point(p, cfg, windows, step, lr, recent, t0, log))
            recent = []
        if on_step is not None:
            on_step(step, min(1.0, _progress(step, time.monotonic() - t0, tc)))
    if recent or not curve:
        curve.append(_curve_point(p, cfg, windows, step, _lr_at(step, 1.0, tc), recent, t0, log))
    stopped_by = "steps" if step >= tc.steps else "time"
    return TrainResult(numpy_weights(p), curve, time.monotonic() - t0, step,
                       step * tc.batch * tc.seq_len, stopped_by)


def _curve_point(p: dict[str, torch.Tensor], cfg: ModelConfig, windows: dict[str, np.ndarray], step: int,
                 lr: float, recent: list[tuple[float, float, dict[str, float]]], t0: float, log: Log
                 ) -> dict[str, Any]:
    held = evaluate(p, cfg, windows)
    train_by_domain: dict[str, float] = {}
    for d in DOMAINS:
        vals = [r[2][d] for r in recent if d in r[2]]
        if vals:
            train_by_domain[d] = round(float(np.mean(vals)), 4)
    point: dict[str, Any] = {
        "step": step, "seconds": round(time.monotonic() - t0, 1), "lr": float(f"{lr:.3g}"),
        "train_loss": round(float(np.mean([r[0] for r in recent])), 4) if recent else None,
        "train_by_domain": train_by_domain,
        "aux_loss": round(float(np.mean([r[1] for r in recent])), 4) if recent else None,
        "heldout_loss": round(held["all"], 4),
        "heldout_by_domain": {k: round(v, 4) for k, v in held.items() if k != "all"},
    }
    train_s = f"{point['train_loss']:.3f}" if recent else "  -  "
    log(f"step {step:5d}  {point['seconds']:7.1f}s  lr {lr:.2e}  train {train_s}  "
        f"held-out {point['heldout_loss']:.3f}  aux {point['aux_loss'] or 0:.3f}  ("
        + " ".join(f"{k} {v:.2f}" for k, v in point["heldout_by_domain"].items()) + ")")
    return point


def torch_logits(w: Weights, cfg: ModelConfig, ids: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [T, V] and per-layer selected experts of one sequence through :func:`torch_forward`."""
    torch = _torch()
    p = {n: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for n, a in w.items()}
    with torch.no_grad():
        logits, _, routes = torch_forward(p, cfg, torch.tensor([list(ids)], dtype=torch.int64))
    return logits[0].numpy(), [r.numpy() for r in routes]


def f16_rounded(w: Weights) -> Weights:
    """The weights as a F16 GGUF holds them (matrices rounded to F16, norms/router F32)."""
    return {n: export_array(n, a, "f16").astype(np.float32) for n, a in w.items()}


def next_token_loss(logits: np.ndarray, ids: Sequence[int]) -> float:
    """Mean cross-entropy (nats) of ``ids[1:]`` under ``logits[:-1]``."""
    lg = logits[:-1].astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
    tgt = np.asarray(ids[1:], dtype=np.int64)
    return float(np.mean(lse - lg[np.arange(len(tgt)), tgt]))


Forward = Callable[[Sequence[int]], tuple[np.ndarray, list[np.ndarray]]]


def compare_with_llama(model_path: str | os.PathLike[str], n_expert: int, n_used: int, forward: Forward,
                       windows: dict[str, Sequence[int]], n_threads: int = 2) -> dict[str, Any]:
    """llama.cpp (F32 K/V cache, no flash attention, every position's logits) against ``forward``
    (e.g. :func:`torch_logits` or :func:`numpy_forward` with the weights the GGUF holds) on each
    domain's window: logit differences, top-1 agreement, agreement of the selected expert sets
    (read from llama.cpp's router through :class:`RouterProbe`), next-token loss of both."""
    n_ctx = max(32, max(len(w) for w in windows.values()))
    per: dict[str, dict[str, Any]] = {}
    refs, gots = [], []
    same_routes, n_routes = 0, 0
    with LlamaRunner(Path(model_path), n_ctx=n_ctx, n_threads=n_threads, f32_kv=True, probe_experts=n_expert) as r:
        assert r.probe is not None
        for dom, ids in windows.items():
            ids = [int(i) for i in ids]
            got = r.logits(ids)
            probs = r.probe.take()
            ref, routes = forward(ids)
            llama_sel = [np.sort(np.argsort(-pr, axis=-1, kind="stable")[:, :n_used], axis=-1) for pr in probs]
            agree = [np.all(np.sort(rt, axis=-1) == ls, axis=-1) for rt, ls in zip(routes, llama_sel, strict=True)]
            same = int(sum(a.sum() for a in agree))
            total = int(sum(a.size for a in agree))
            same_routes += same
            n_routes += total
            per[dom] = {**logits_match(ref, got), "route_agreement": round(same / total, 6),
                        "loss_reference": round(next_token_loss(ref, ids), 5),
                        "loss_llama": round(next_token_loss(got, ids), 5)}
            refs.append(ref)
            gots.append(got)
    out: dict[str, Any] = {**logits_match(np.concatenate(refs), np.concatenate(gots)),
                           "route_agreement": round(same_routes / max(1, n_routes), 6), "domains": per}
    return out


# =============================================================================================
# Routing statistics
# =============================================================================================


def entropy_bits(counts: np.ndarray | Sequence[int]) -> float:
    """Shannon entropy (bits) of the distribution proportional to ``counts`` (0 when empty)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    q = c / c.sum()
    return float(max(0.0, -(q * np.log2(q)).sum()))


def lru_hits(selected: np.ndarray, capacity: int) -> tuple[int, int]:
    """(hits, accesses) of an LRU of ``capacity`` experts fed token by token with ``selected``
    [T, k] (a token's own experts never evict each other: capacity >= k)."""
    if selected.ndim != 2 or capacity < selected.shape[1]:
        raise SmoeError(f"an LRU of {capacity} cannot hold one token's {selected.shape[-1]} experts")
    cache: dict[int, None] = {}
    hits = 0
    for row in selected.tolist():
        for e in row:
            if e in cache:
                hits += 1
                del cache[e]
            cache[e] = None
        while len(cache) > capacity:
            cache.pop(next(iter(cache)))
    return hits, int(selected.size)


CODE = "code"
PROSE = "prose"
GROUPS: dict[str, tuple[str, ...]] = {CODE: CODE_DOMAINS, PROSE: PROSE_DOMAINS}
LRU_FRACTIONS: tuple[float, ...] = (0.125, 0.25, 0.5)


def lru_capacities(n_expert: int, n_used: int, fractions: Sequence[float] = LRU_FRACTIONS) -> list[int]:
    """Per-layer LRU sizes (experts) for the given fractions of ``n_expert``, at least ``n_used``."""
    return sorted({min(n_expert, max(n_used, int(round(f * n_expert)))) for f in fractions})


def summarise_routes(selected: dict[str, list[np.ndarray]], n_expert: int,
                     probs: dict[str, list[np.ndarray]] | None = None,
                     lru_fractions: Sequence[float] = LRU_FRACTIONS, seed: int = 0) -> dict[str, Any]:
    """Routing figures from each domain's per-layer selections ``selected[domain][layer]`` [T, k]
    (token order) and, optionally, router probabilities ``probs[domain][layer]`` [T, n_expert].

    - ``usage_entropy_bits``: entropy of the domain's expert-usage distribution per layer (how
      many experts the domain spreads over; ``log2(n_expert)`` when it uses all equally);
    - ``domain_expert_mutual_information_bits``: I(domain; expert) per layer (0: the router does
      not tell domains apart; at most log2(#domains));
    - ``token_router_entropy_bits``: mean entropy of one token's router distribution;
    - ``lru_hit_rate``: hit rate of a per-layer LRU of each capacity, fed token by token; per
      domain and pooled per group (code: python, c; prose: man, doc). ``shuffled``: the same
      selections in a random token order (what the usage skew alone gives, without locality);
      ``uniform``: capacity / n_expert (uniform random routing)."""
    doms = list(selected)
    if not doms:
        raise SmoeError("no routes to summarise")
    n_layer = len(selected[doms[0]])
    n_used = int(selected[doms[0]][0].shape[1])
    caps = lru_capacities(n_expert, n_used, lru_fractions)
    rng = np.random.default_rng(seed)
    usage: dict[str, np.ndarray] = {}
    hits: dict[str, dict[int, list[tuple[int, int]]]] = {}
    shuffled: dict[str, dict[int, list[tuple[int, int]]]] = {}
    per_domain: dict[str, dict[str, Any]] = {}
    for dom in doms:
        sel = selected[dom]
        usage[dom] = np.stack([np.bincount(s.ravel(), minlength=n_expert) for s in sel])
        perms = [rng.permutation(len(s)) for s in sel]
        hits[dom] = {c: [lru_hits(s, c) for s in sel] for c in caps}
        shuffled[dom] = {c: [lru_hits(s[pm], c) for s, pm in zip(sel, perms)] for c in caps}
        ent = [entropy_bits(u) for u in usage[dom]]
        d: dict[str, Any] = {
            "tokens": int(len(sel[0])),
            "usage_entropy_bits": [round(x, 4) for x in ent],
            "usage_entropy_bits_mean": round(float(np.mean(ent)), 4),
            "lru_hit_rate": {str(c): [round(h / max(1, a), 4) for h, a in hits[dom][c]] for c in caps},
            "usage": usage[dom].tolist(),
        }
        if probs is not None:
            d["token_router_entropy_bits"] = [
                round(float(np.mean(-(p * np.log2(np.maximum(p, 1e-30))).sum(-1))), 4) for p in probs[dom]]
        per_domain[dom] = d
    mi = []
    for il in range(n_layer):
        joint = np.stack([usage[d][il] for d in doms]).astype(np.float64)
        pj = joint / joint.sum()
        pd, pe = pj.sum(1, keepdims=True), pj.sum(0, keepdims=True)
        nz = pj > 0
        mi.append(round(float(max(0.0, (pj[nz] * np.log2(pj[nz] / (pd @ pe)[nz])).sum())), 4))
    all_ent = [entropy_bits(sum(usage[d][il] for d in doms)) for il in range(n_layer)]
    groups: dict[str, Any] = {}
    for group, members in GROUPS.items():
        have = [d for d in members if d in per_domain]
        if not have:
            continue
        g: dict[str, Any] = {"domains": have, "lru_hit_rate": {}, "lru_hit_rate_mean": {},
                             "lru_hit_rate_shuffled_mean": {}}
        for c in caps:
            rates = []
            for il in range(n_layer):
                h = sum(hits[d][c][il][0] for d in have)
                a = sum(hits[d][c][il][1] for d in have)
                rates.append(h / max(1, a))
            sh = sum(shuffled[d][c][il][0] for d in have for il in range(n_layer))
            sa = sum(shuffled[d][c][il][1] for d in have for il in range(n_layer))
            g["lru_hit_rate"][str(c)] = [round(x, 4) for x in rates]
            g["lru_hit_rate_mean"][str(c)] = round(float(np.mean(rates)), 4)
            g["lru_hit_rate_shuffled_mean"][str(c)] = round(sh / max(1, sa), 4)
        g["usage_entropy_bits_mean"] = round(float(np.mean([per_domain[d]["usage_entropy_bits_mean"]
                                                            for d in have])), 4)
        groups[group] = g
    return {
        "n_layer": n_layer, "n_expert": n_expert, "n_used": n_used,
        "max_entropy_bits": round(math.log2(n_expert), 4),
        "lru_capacities": caps,
        "uniform_lru_hit_rate": {str(c): round(c / n_expert, 4) for c in caps},
        "domains": per_domain,
        "all_usage_entropy_bits": [round(x, 4) for x in all_ent],
        "domain_expert_mutual_information_bits": mi,
        "domain_expert_mutual_information_bits_mean": round(float(np.mean(mi)), 4),
        "groups": groups,
    }


def llama_router_probs(runner: LlamaRunner, ids: Sequence[int], chunk: int) -> list[np.ndarray]:
    """Each layer's router probabilities [len(ids), n_expert] from llama.cpp, ``ids`` decoded in
    independent contexts of ``chunk`` tokens (each from position 0)."""
    if runner.probe is None:
        raise SmoeError("the runner has no router probe (probe_experts=0)")
    layers: list[list[np.ndarray]] = []
    for s in range(0, len(ids), chunk):
        # every position's output: with only the last one, llama.cpp drops the other rows
        # before the last layer's FFN (inp_out_ids), and that layer's router sees one token
        runner.logits(ids[s:s + chunk])
        got = runner.probe.take()
        if not layers:
            layers = [[] for _ in got]
        for il, pr in enumerate(got):
            layers[il].append(pr)
    return [np.concatenate(lp) for lp in layers]


def domain_token_ids(tok: Tokenizer, texts: Sequence[str], max_tokens: int) -> list[int]:
    """The texts' tokens, each text followed by <|endoftext|>, cut at ``max_tokens``."""
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, parse_special=False) + [tok.eot]
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def route_stats(model_path: str | os.PathLike[str], texts: dict[str, Sequence[str]], max_tokens: int = 8192,
                lru_fractions: Sequence[float] = LRU_FRACTIONS, chunk: int = 256, n_threads: int = 2,
                seed: int = 0) -> dict[str, Any]:
    """Routing of stock llama.cpp on each domain's texts (tokenized with the model's own
    vocabulary, in token order, contexts of ``chunk`` tokens): :func:`summarise_routes` of the
    top-k of the router probabilities read at ``ffn_moe_probs-<layer>``."""
    path = Path(model_path)
    cfg, _ = _gguf_config(path)
    tok = Tokenizer.from_gguf(path)
    selected: dict[str, list[np.ndarray]] = {}
    probs: dict[str, list[np.ndarray]] = {}
    with LlamaRunner(path, n_ctx=chunk, n_threads=n_threads, f32_kv=False, probe_experts=cfg.n_expert) as r:
        for dom, docs in texts.items():
            ids = domain_token_ids(tok, docs, max_tokens)
            if not ids:
                continue
            probs[dom] = llama_router_probs(r, ids, chunk)
            selected[dom] = [np.argsort(-p, axis=-1, kind="stable")[:, :cfg.n_used] for p in probs[dom]]
    out = summarise_routes(selected, cfg.n_expert, probs, lru_fractions, seed)
    out["model"] = str(path)
    out["chunk_tokens"] = chunk
    return out


def _gguf_config(path: Path) -> tuple[ModelConfig, gguf.GGUFReader]:
    r = gguf.GGUFReader(path)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")

    def u32(key: str) -> int:
        return int(r.fields[f"{arch}.{key}"].parts[-1][0])

    cfg = ModelConfig(n_vocab=len(r.fields["tokenizer.ggml.tokens"].data), n_layer=u32("block_count"),
                      n_embd=u32("embedding_length"), n_head=u32("attention.head_count"),
                      n_head_kv=u32("attention.head_count_kv"), head_dim=u32("attention.key_length"),
                      n_expert=u32("expert_count"), n_used=u32("expert_used_count"),
                      n_ff_exp=u32("expert_feed_forward_length"), n_ctx_train=u32("context_length"))
    return cfg, r


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


def format_route_table(stats: dict[str, Any]) -> str:
    """Plain-text tables of :func:`summarise_routes`' figures: one row per layer, then means."""
    doms = list(stats["domains"])
    caps = [str(c) for c in stats["lru_capacities"]]
    groups = [g for g in (CODE, PROSE) if g in stats["groups"]]
    head = ["layer"] + [f"H({d})" for d in doms] + ["H(all)", "MI"]
    head += [f"{g}@{c}" for c in caps for g in groups]
    rows = [head]
    n_layer = stats["n_layer"]
    for il in range(n_layer + 1):
        last = il == n_layer

        def pick(xs: list[float], il: int = il, last: bool = last) -> float:
            return float(np.mean(xs)) if last else float(xs[il])

        row = ["mean" if last else str(il)]
        row += [f"{pick(stats['domains'][d]['usage_entropy_bits']):.2f}" for d in doms]
        row += [f"{pick(stats['all_usage_entropy_bits']):.2f}",
                f"{pick(stats['domain_expert_mutual_information_bits']):.3f}"]
        row += [f"{100 * pick(stats['groups'][g]['lru_hit_rate'][c]):.1f}%" for c in caps for g in groups]
        rows.append(row)
    lines = _table(rows)
    base = [["LRU size", *[f"{g}" for g in groups], *[f"{g} shuffled" for g in groups], "uniform"]]
    for c in caps:
        base.append([f"{c}/{stats['n_expert']}",
                     *[f"{100 * stats['groups'][g]['lru_hit_rate_mean'][c]:.1f}%" for g in groups],
                     *[f"{100 * stats['groups'][g]['lru_hit_rate_shuffled_mean'][c]:.1f}%" for g in groups],
                     f"{100 * stats['uniform_lru_hit_rate'][c]:.1f}%"])
    foot = (f"H = entropy (bits) of the experts' usage over a domain's tokens (max {stats['max_entropy_bits']}); "
            f"MI = mutual information domain/expert (bits, max {math.log2(max(2, len(doms))):.0f}); "
            f"{'/'.join(groups)}@N = hit rate of a per-layer LRU of N of {stats['n_expert']} experts, "
            f"fed token by token.")
    return "\n".join(lines + ["", *_table(base), "", foot])


def save_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dst, ".part")
    try:
        tmp.write_text(_compact_json(obj) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# json.dumps(indent=...) puts every item on its own line; a raw newline never occurs in a string.
_NUMBER_LIST = re.compile(r"\[\n\s*((?:-?[0-9][0-9.eE+-]*|null)(?:,\n\s*(?:-?[0-9][0-9.eE+-]*|null))*)\n\s*\]")


def _compact_json(obj: Any) -> str:
    """Indented JSON with every list of plain numbers on one line."""
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                            json.dumps(obj, indent=1))
