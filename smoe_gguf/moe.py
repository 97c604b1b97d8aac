"""The MoE view of a GGUF layout: which tensors are the dense core, which are leaves and parts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from . import archs
from .errors import SmoeError
from .gguf_layout import GGUFLayout, TensorInfo


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
        """The smallest X-Slot that can run one token: one layer's selected leaves at a time."""
        return self.max_leaf_bytes * self.n_expert_used

    @cached_property
    def shared_expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.core_tensors if archs.is_shared_expert_tensor(t.name))

    def require_moe(self) -> "MoEModel":
        if not self.is_moe:
            raise SmoeError(
                f"{self.layout.path}: dense model ({self.arch}, no routed expert tensors): nothing to page"
            )
        return self


def analyze(layout: GGUFLayout) -> MoEModel:
    """Classify every tensor of ``layout`` as dense core or routed-expert part."""
    arch = layout.architecture
    if layout.value("split.count", 1) > 1:
        raise SmoeError(
            f"{layout.path}: multi-file GGUF (split {layout.value('split.no', 0) + 1} of "
            f"{layout.value('split.count')}): merge it first with llama-gguf-split --merge"
        )
    n_expert = int(layout.value(archs.meta_key(arch, "expert_count"), 0) or 0)
    expert_tensors: dict[int, list[ExpertTensor]] = {}
    core: list[TensorInfo] = []
    for t in layout.tensors:
        parsed = archs.parse_expert_tensor(t.name)
        if parsed is None:
            core.append(t)
            continue
        layer, part, stage = parsed
        if n_expert <= 1:
            raise SmoeError(f"{layout.path}: tensor {t.name} found but {arch}.expert_count is {n_expert}")
        if not t.shape or t.shape[-1] != n_expert:
            raise SmoeError(
                f"{layout.path}: tensor {t.name} has shape {list(t.shape)}, expected outermost dim {n_expert}"
            )
        expert_tensors.setdefault(layer, []).append(ExpertTensor(t, layer, part, stage, n_expert))
    return MoEModel(
        layout=layout,
        arch=arch,
        n_layer=int(layout.value(archs.meta_key(arch, "block_count"), 0) or 0),
        n_expert=n_expert,
        n_expert_used=int(layout.value(archs.meta_key(arch, "expert_used_count"), 0) or 0),
        n_expert_shared=int(layout.value(archs.meta_key(arch, "expert_shared_count"), 0) or 0)
        or (1 if any(archs.is_shared_expert_tensor(t.name) for t in core) else 0),
        expert_tensors=expert_tensors,
        core_tensors=core,
    )
