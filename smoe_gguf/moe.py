"""The MoE view of a GGUF layout: which tensors are the dense core, which are leaves and parts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from . import archs, budget
from .errors import SmoeError
from .gguf_layout import T_STRING, GGUFLayout, TensorInfo, int_value, type_name


@dataclass(frozen=True)
class ExpertTensor:
    """One merged routed-expert tensor of one layer; slice ``e`` is part ``part`` of leaf (layer, e)."""

    info: TensorInfo
    layer: int
    part: str
    stage: int
    n_expert: int

    @property
    def slice_bytes(self) -> int:
        return self.info.nbytes // self.n_expert

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.info.shape[:-1]

    def slice_offset(self, expert: int) -> int:
        return self.info.offset + expert * self.slice_bytes


@dataclass
class MoEModel:
    layout: GGUFLayout
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    expert_tensors: dict[int, list[ExpertTensor]]  # layer -> parts, in file order
    core_tensors: list[TensorInfo]

    @property
    def is_moe(self) -> bool:
        return bool(self.expert_tensors)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.expert_tensors)

    def leaf_bytes(self, layer: int) -> int:
        return sum(t.slice_bytes for t in self.expert_tensors[layer])

    @cached_property
    def max_leaf_bytes(self) -> int:
        return max((self.leaf_bytes(layer) for layer in self.expert_tensors), default=0)

    @cached_property
    def core_bytes(self) -> int:
        return sum(t.nbytes for t in self.core_tensors)

    @cached_property
    def expert_bytes(self) -> int:
        return sum(t.info.nbytes for ts in self.expert_tensors.values() for t in ts)

    @property
    def n_leaves(self) -> int:
        return len(self.expert_tensors) * self.n_expert

    @property
    def active_expert_bytes_per_token(self) -> int:
        return sum(self.leaf_bytes(layer) * self.n_expert_used for layer in self.expert_tensors)

    @property
    def min_budget(self) -> int:
        """The smallest X-Slot that can run one token: one layer's selected leaves at a time,
        each charged its page footprint (budget.leaf_cost), as the engine charges it."""
        return budget.min_budget(self.max_leaf_cost, self.n_expert_used)

    @property
    def max_leaf_cost(self) -> int:
        """The largest leaf's charge against the budget (budget.leaf_cost)."""
        return max(budget.leaf_cost(t.slice_bytes for t in ts) for ts in self.expert_tensors.values())

    @property
    def layer_budget(self) -> int:
        """The budget from which prompts read each leaf once per micro-batch: one layer of experts,
        or where every leaf has gate/up and down parts (served one stage at a time), one layer of
        the larger stage."""
        staged = budget.stage_leaf_cost(budget.stage_costs((t.stage, t.slice_bytes) for t in ts)
                                        for ts in self.expert_tensors.values())
        return budget.layer_budget(staged or self.max_leaf_cost, self.n_expert)

    @cached_property
    def shared_expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.core_tensors if archs.is_shared_expert_tensor(t.name))

    def require_moe(self) -> "MoEModel":
        if not self.is_moe:
            raise SmoeError(
                f"{self.layout.path}: dense model ({self.arch}, no routed expert tensors): nothing to page"
            )
        archs.require_supported(self.arch, str(self.layout.path))
        return self


# llama.cpp's own limits (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS): beyond them it aborts.
MAX_LAYERS = 512
MAX_EXPERTS = 512


def analyze(layout: GGUFLayout) -> MoEModel:
    """Classify every tensor of ``layout`` as dense core or routed-expert part, after checking the
    MoE keys as llama.cpp needs them (integers in its ranges; it aborts on anything else)."""
    arch_kv = layout.kvs.get("general.architecture")
    if arch_kv is not None and arch_kv.vtype != T_STRING:
        raise SmoeError(f"{layout.path}: key general.architecture is a {type_name(arch_kv.vtype)}, not a string")
    arch = layout.architecture
    _check_tokenizer(layout)
    split_count = int_value(layout, "split.count", 0, 1 << 16, default=1)
    if split_count > 1:
        split_no = int_value(layout, "split.no", 0, 1 << 16, default=0)
        raise SmoeError(
            f"{layout.path}: multi-file GGUF (split {split_no + 1} of "
            f"{split_count}): merge it first with llama-gguf-split --merge"
        )
    experts = [(t, parsed) for t in layout.tensors if (parsed := archs.parse_expert_tensor(t.name)) is not None]
    key = lambda what: archs.meta_key(arch, what)  # noqa: E731
    if experts:
        n_layer = int_value(layout, key("block_count"), 1, MAX_LAYERS)
        n_expert = int_value(layout, key("expert_count"), 0, MAX_EXPERTS, default=0)
        if n_expert <= 1:
            raise SmoeError(f"{layout.path}: tensor {experts[0][0].name} found but {arch}.expert_count is {n_expert}")
        n_expert_used = int_value(layout, key("expert_used_count"), 1, n_expert)
        n_shared = int_value(layout, key("expert_shared_count"), 0, MAX_EXPERTS, default=0)
    else:
        n_layer = int_value(layout, key("block_count"), 0, MAX_LAYERS, default=0)
        n_expert = int_value(layout, key("expert_count"), 0, MAX_EXPERTS, default=0)
        n_expert_used = int_value(layout, key("expert_used_count"), 0, MAX_EXPERTS, default=0)
        n_shared = int_value(layout, key("expert_shared_count"), 0, MAX_EXPERTS, default=0)
    expert_tensors: dict[int, list[ExpertTensor]] = {}
    core: list[TensorInfo] = [t for t in layout.tensors if archs.parse_expert_tensor(t.name) is None]
    for t, (layer, part, stage) in experts:
        if layer >= n_layer:
            raise SmoeError(f"{layout.path}: tensor {t.name} is in layer {layer}, but {arch}.block_count is {n_layer}")
        if not t.shape or t.shape[-1] != n_expert:
            raise SmoeError(
                f"{layout.path}: tensor {t.name} has shape {list(t.shape)}, expected outermost dim {n_expert}"
            )
        expert_tensors.setdefault(layer, []).append(ExpertTensor(t, layer, part, stage, n_expert))
    return MoEModel(
        layout=layout,
        arch=arch,
        n_layer=n_layer,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_expert_shared=n_shared or (1 if any(archs.is_shared_expert_tensor(t.name) for t in core) else 0),
        expert_tensors=expert_tensors,
        core_tensors=core,
    )


def _check_tokenizer(layout: GGUFLayout) -> None:
    """What llama.cpp's vocabulary loader asserts on (it aborts the process): token texts that
    repeat, and per-token arrays of another length than the token list."""
    tokens = layout.value("tokenizer.ggml.tokens")
    if tokens is None:
        return
    kv = layout.kvs["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or (tokens and not all(isinstance(t, str) for t in tokens)):
        raise SmoeError(f"{layout.path}: key tokenizer.ggml.tokens is a {type_name(kv.vtype)}, not a list of strings")
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))  # type: ignore[func-returns-value]
        raise SmoeError(f"{layout.path}: tokenizer.ggml.tokens holds {dup[:40]!r} twice (llama.cpp refuses it)")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        arr = layout.value(key)
        if arr is not None and (not isinstance(arr, list) or len(arr) != len(tokens)):
            n = len(arr) if isinstance(arr, list) else "not a list"
            raise SmoeError(f"{layout.path}: key {key} has {n} items for {len(tokens)} tokens")
