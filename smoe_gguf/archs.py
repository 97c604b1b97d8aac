"""Architecture table: the one place that knows how MoE tensors and keys are named.

llama.cpp stores the routed experts of layer L as merged tensors
``blk.L.ffn_{gate,up,down}_exps.weight`` (and, for some architectures, per-expert biases or
scales) whose outermost dimension is the expert index. Everything here is keyed by those
names; no other module spells a tensor name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import SmoeError

if TYPE_CHECKING:
    from .gguf_layout import GGUFLayout

# Routed-expert tensors: suffix after "blk.L." -> (part name, pipeline stage).
# Stage 0 parts are needed by the gate/up matmuls, stage 1 parts by the down matmul, so a
# leaf's stage-1 parts can arrive while stage 0 is being computed.
EXPERT_PARTS: dict[str, tuple[str, int]] = {
    "ffn_gate_exps.weight": ("gate", 0),
    "ffn_up_exps.weight": ("up", 0),
    "ffn_gate_up_exps.weight": ("gate_up", 0),
    "ffn_gate_exps.bias": ("gate_bias", 0),
    "ffn_up_exps.bias": ("up_bias", 0),
    "ffn_gate_up_exps.bias": ("gate_up_bias", 0),
    "ffn_gate_exps.scale": ("gate_scale", 0),
    "ffn_up_exps.scale": ("up_scale", 0),
    "ffn_down_exps.weight": ("down", 1),
    "ffn_down_exps.bias": ("down_bias", 1),
    "ffn_down_exps.scale": ("down_scale", 1),
}

_EXPERT_RE = re.compile(r"^blk\.(\d+)\.(" + "|".join(re.escape(k) for k in EXPERT_PARTS) + r")$")
_SHARED_RE = re.compile(r"^blk\.(\d+)\.ffn_\w+_shexp\.\w+$")

# Regex handed to llama.cpp's tensor_buft_overrides: every routed-expert tensor goes to the X-Slot.
EXPERT_TENSOR_PATTERN = r"\.ffn_(gate|up|down|gate_up)_exps\."

# Eval-graph node names written by llama.cpp's build_moe_ffn (src/llama-graph.cpp), shared by
# every MoE architecture. Format: "<name>-<layer>".
NODE_TOPK = "ffn_moe_topk"
NODE_ROUTER_INPUT = "ffn_norm"
# The activation node just before the down matmul (part pipelining gates it); gpt-oss names its own.
NODE_BEFORE_DOWN = ("ffn_moe_swiglu", "ffn_moe_swiglu_oai", "ffn_moe_geglu")


TESTED = "tested"  # a test model of it runs bit-exact against stock llama.cpp
UNTESTED = "untested"  # expected to work, not yet run by the tests
UNSUPPORTED = "unsupported"  # refused by split and run
STATUSES = (TESTED, UNTESTED, UNSUPPORTED)


@dataclass(frozen=True)
class ArchInfo:
    """What smoe-gguf needs to know of one llama.cpp architecture."""

    name: str
    label: str  # how a person would call it
    routing: str  # softmax top-k, sigmoid, ... (information for `inspect`)
    status: str = TESTED
    missing: str = ""  # for an unsupported architecture: what smoe-gguf lacks to page it


# MoE architectures by llama.cpp's name (its key prefix "<arch>."). llama.cpp has no "mixtral":
# Mixtral GGUFs are "llama" with experts.
ARCHS: dict[str, ArchInfo] = {
    a.name: a
    for a in (
        ArchInfo("qwen3moe", "Qwen3-MoE", "softmax top-k"),
        ArchInfo("qwen2moe", "Qwen2-MoE (shared expert)", "softmax top-k + gated shared expert"),
        ArchInfo("llama", "Mixtral (llama with experts)", "softmax top-k"),
        ArchInfo("gpt-oss", "gpt-oss (expert biases)", "softmax over top-k, biased experts"),
        ArchInfo("deepseek2", "DeepSeek-V2/V3, R1, Kimi-K2 (MLA, dense first layers, shared expert)",
                 "sigmoid over the best expert groups + expert bias (V2: softmax)"),
        ArchInfo("glm4moe", "GLM-4.5/4.6 (dense first layer, shared expert, MTP block)", "sigmoid + expert bias"),
        ArchInfo("granitemoe", "Granite MoE", "softmax top-k"),
        ArchInfo("olmoe", "OLMoE", "softmax top-k"),
        ArchInfo("dbrx", "DBRX", "softmax top-k"),
        ArchInfo("llama4", "Llama 4 (experts every other layer, shared expert)", "sigmoid top-k"),
        ArchInfo("qwen3next", "Qwen3-Next (hybrid linear attention, shared expert)",
                 "softmax top-k + gated shared expert"),
    )
}


def support(arch: str) -> str:
    """``tested``, ``untested`` or ``unsupported`` (an architecture the table does not know)."""
    info = ARCHS.get(arch)
    return UNSUPPORTED if info is None else info.status


def require_supported(arch: str, where: str) -> None:
    """Refuse to page the routed experts of an architecture that is unsupported or unknown."""
    info = ARCHS.get(arch)
    if info is not None and info.status != UNSUPPORTED:
        return
    missing = info.missing if info is not None else (
        "it is not in smoe-gguf's architecture table, so where its experts sit and how they are "
        "routed is unverified")
    raise SmoeError(f"{where}: MoE architecture {arch!r} is unsupported: {missing} "
                    f"(supported: {', '.join(a for a in ARCHS if support(a) != UNSUPPORTED)})")


def nextn_layers(layout: GGUFLayout) -> int:
    """MTP (next-token prediction) blocks at the end of the model: llama.cpp does not load them."""
    return int(layout.value(meta_key(layout.architecture, "nextn_predict_layers"), 0) or 0)


def meta_key(arch: str, what: str) -> str:
    """llama.cpp's per-architecture metadata key, e.g. ``qwen3moe.expert_count``."""
    return f"{arch}.{what}"


def parse_expert_tensor(name: str) -> tuple[int, str, int] | None:
    """``blk.3.ffn_down_exps.weight`` -> (3, "down", 1); None for anything that is not routed."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    part, stage = EXPERT_PARTS[m.group(2)]
    return int(m.group(1)), part, stage


def is_shared_expert_tensor(name: str) -> bool:
    return _SHARED_RE.match(name) is not None
