"""The X-Slot: a ggml buffer type whose memory is reserved address space, filled slice by slice.

llama.cpp is told (``tensor_buft_overrides``) to put every routed-expert tensor in an ``XSLOT``
buffer. Its ``alloc_buffer`` only reserves address space (anonymous ``MAP_NORESERVE``), so a
tensor of any size costs nothing until a page is written.

While the model loads, llama.cpp's loader reads none of an expert tensor's bytes, in any load mode:
``init_tensor`` records where the tensor lives and renames it (:data:`HIDDEN_PREFIX`), and
``llama_model_loader::load_all_data`` passes over a tensor whose name it cannot find among the
file's weights (``get_weight`` returns null: no read, no ``set_tensor``, no mmap of its range).
:meth:`XSlot.finish_loading` gives the names back before any graph is built. Should something
else offer bytes meanwhile, ``is_host`` is false and ``set_tensor`` copies nothing (the bytes are
dropped). Afterwards ``is_host`` is true, so the CPU backend computes
directly on the reserved memory, and the caller makes expert slices resident (:meth:`XSlot.fill_slice`
/ :meth:`XSlot.load_slice` copy, :meth:`XSlot.claim_slice` hands the address to a reader,
:meth:`XSlot.map_slice` maps a page-aligned file range) or evicts
them (map fresh anonymous pages over them) between the router and the expert matmuls.

Page accounting. Slice ``e`` of a tensor is the byte range ``[addr + e*S, addr + (e+1)*S)``;
tensors start page-aligned (``get_alignment`` is at least the page size) but ``S`` need not be
a page multiple, so the first and last page of a slice may hold bytes of its neighbours. Loading a
slice writes (and so makes resident) every page it touches. Evicting it releases every page it
touches that no *still-resident* slice of the same tensor touches; a boundary page shared with a
resident neighbour stays until that neighbour goes too. A slice evicted to make room for another
of the same size can instead hand its pages to that one (:meth:`XSlot.move_slice`, page-aligned
slices only: ``mremap``), which is *claimed* at once and then filled without a fault or a
zero-fill; a claimed slice counts as resident here. Hence, exactly:

    physically resident pages == union of the pages touched by resident slices

(:meth:`XSlot.resident_page_bytes` computes it from the bookkeeping, :meth:`XSlot.mincore_bytes`
asks the kernel) and, per resident slice, at most ``ceil(S / page) + 1`` pages, i.e. the slack
over the logical :attr:`XSlot.resident_bytes` is below one page plus the rounding of ``S`` per
resident slice (:meth:`XSlot.page_slack_bound`).

``mincore`` also counts a page that was only *read*: reading a never-written anonymous page maps
the kernel's shared zero page. The gate guarantees that llama.cpp reads only resident slices, so
the two counts agree; a reader of non-resident slices (the negative control in the tests, a
checksum over the whole tensor) makes ``mincore`` report more than the memory really used.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from . import archs, native
from . import ggml_abi as abi
from .errors import SmoeError
from .native import NativeLock

PAGE = mmap.PAGESIZE
ALIGNMENT = max(4096, PAGE)
# What an X-Slot tensor is called while the model loads: a name llama.cpp never looks up.
HIDDEN_PREFIX = b"xslot.hidden."

_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
if sys.platform == "darwin":
    _MAP_FIXED, _MAP_NORESERVE = 0x10, 0x40
else:
    _MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000
_MAP_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
# Advice against transparent huge pages: needed on every fresh mapping only where the kernel would
# give them unasked (mode "always", below); needed always to take back a mapping's own request.
_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", None)
_MADV_NOHUGEPAGE = _NOHUGEPAGE


def _thp_always() -> bool:
    """Whether the kernel may back any anonymous mapping with transparent huge pages (mode
    "always"); in "madvise" and "never" modes a mapping never asks for them, so advising
    against them costs a system call per mapping for nothing."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[always]" in f.read()
    except OSError:
        return True  # unknown: advise


if _MADV_NOHUGEPAGE is not None and not _thp_always():
    _MADV_NOHUGEPAGE = None
# Where every leaf stays resident (huge_pages), the buffers ask for transparent huge pages: the
# expert matmuls then walk a 2 MiB page where they would walk 512 small ones.
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
# Fault a slice's pages in with one call before copying into it (instead of one fault per 4 KiB
# page during the copy): 1 MiB slices from a page-cached file, 2.8 GB/s instead of 2.3 GB/s
# on the project machine. Linux >= 5.14; switched off when the kernel refuses it.
_MADV_POPULATE_WRITE: int | None = 23 if sys.platform.startswith("linux") else None
_MADV_POPULATE_READ: int | None = 22 if sys.platform.startswith("linux") else None
# Moving pages from an evicted slice to the one about to be filled (Linux >= 5.7): mremap with
# MREMAP_DONTUNMAP leaves the source range mapped (empty), so no other mmap can land in a hole.
_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4
_mremap = None
# Slices holding pages moved into them are one VMA each; stay well below vm.max_map_count (65530).
MAX_MOVED_SLICES = 16384
if sys.platform.startswith("linux"):
    _mremap = getattr(abi.libc, "mremap", None)
    if _mremap is not None:
        _mremap.restype = ctypes.c_void_p
        _mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]


class _BuftAnswers(ctypes.Structure):
    """``struct smoe_buft_answers`` in _xslot_buft.c (checked against its sizeof at load)."""

    _fields_ = [("name", ctypes.c_void_p), ("alignment", ctypes.c_uint64), ("is_host", ctypes.c_int32)]


def _buft_lib() -> ctypes.CDLL:
    """The native library, told where ggml's buffer type keeps its context."""
    lb = native.lib()
    native.check_sizeof(lb, "buft_answers", ctypes.sizeof(_BuftAnswers), "xslot.py")
    lb.smoe_buft_set_context_offset.restype = None
    lb.smoe_buft_set_context_offset.argtypes = [ctypes.c_int64]
    lb.smoe_buft_set_context_offset(abi.GgmlBackendBufferType.context.offset)  # type: ignore[attr-defined]
    return lb


@dataclass(frozen=True)
class Region:
    """Where one expert tensor lives in the X-Slot."""

    name: str
    address: int
    nbytes: int
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    n_expert: int  # ne of the outermost non-trivial dimension
    slice_bytes: int  # nb of that dimension: one expert's contiguous bytes
    tensor: int = 0  # address of the ggml_tensor

    def slice_address(self, expert: int) -> int:
        return self.address + expert * self.slice_bytes


def _map_anon(address: int, size: int, fixed: bool, huge: bool = False) -> int:
    flags = _MAP_ANON | (_MAP_FIXED if fixed else 0)
    got = abi.libc_mmap(address if fixed else None, size, _PROT_RW, flags, -1, 0)
    if got is None or got == abi.MAP_FAILED or (fixed and got != address):
        err = ctypes.get_errno()
        raise SmoeError(f"X-Slot: mmap of {size} bytes failed: {os.strerror(err)}")
    _advise_pages(int(got), size, huge)
    return int(got)


def _advise_pages(address: int, size: int, huge: bool) -> None:
    """Ask for transparent huge pages (``huge``), or, where the kernel would give them unasked,
    against them: a huge page would make one written 4 KiB page cost 2 MiB and break the page
    accounting of a paged budget. A fresh MAP_FIXED mapping is a new VMA: advised every time."""
    advice = _MADV_HUGEPAGE if huge else _MADV_NOHUGEPAGE
    if advice is not None:
        abi.libc_madvise(address, size, advice)


class XSlot:
    """One X-Slot buffer type (``XSLOT``) and the buffers llama.cpp allocates from it.

    Use: pass :meth:`tensor_buft_overrides` as ``llama_model_params.tensor_buft_overrides``, load
    the model, call :meth:`finish_loading`, then :meth:`load_slice` / :meth:`evict_slice`.
    Not thread-safe; every method is meant to run on the thread that calls ``llama_decode``.
    Keep the object alive until ``llama_model_free`` has returned: ggml calls back into it
    (``free_buffer`` included) through raw pointers.
    """

    def __init__(self, name: str = "XSLOT") -> None:
        abi.ensure_layout()
        self._name = ctypes.create_string_buffer(name.encode())
        self._name_address = ctypes.addressof(self._name)
        # what ggml asks of the buffer type while it schedules a graph, answered in C (_xslot_buft.c)
        self._answers = _BuftAnswers(name=self._name_address, alignment=ALIGNMENT, is_host=0)
        self.loading = True
        self.regions: dict[str, Region] = {}
        self.buffers: dict[int, tuple[int, int]] = {}  # ggml buffer -> (base, size)
        self.offered_bytes = 0  # bytes llama.cpp handed to set_tensor while loading (dropped)
        # tensor -> (its buffer, its real name) while it is hidden from the loader (see the module doc)
        self._hidden: dict[int, tuple[int, bytes]] = {}
        self._region_bytes = 0  # sum of nbytes of all regions
        self.error: str | None = None  # why a tensor was refused (llama.cpp then fails the load)
        self._resident: dict[str, bytearray] = {}  # tensor name -> one flag per expert
        self._flag_views: dict[str, ctypes.Array[ctypes.c_uint8]] = {}  # ... their memory, for native code
        self._views: dict[str, memoryview] = {}  # tensor name -> writable view of its bytes
        self._override_array: ctypes.Array[abi.LlamaTensorBuftOverride] | None = None
        self._override_patterns: list[bytes] = []
        self._populate = _MADV_POPULATE_WRITE is not None
        self.can_move = _mremap is not None  # move_slice moves pages (else it evicts)
        self._huge_pages = False  # see huge_pages
        self.moved_bytes = 0  # bytes of pages move_slice handed from evicted slices to incoming ones
        self._file_mapped: set[tuple[str, int]] = set()  # slices map_slice mapped from a file
        self._moved_in: set[tuple[str, int]] = set()  # resident slices holding pages move_slice gave them
        # Fills of different slices may run in I/O threads while another thread evicts: a slice
        # is claimed (its flag set) under this lock before its pages are written, so an eviction
        # of a neighbour never releases a boundary page being filled. Copies run outside it. The
        # native pager (_pager.c) takes the same lock to change flags and pages.
        self.lock = NativeLock()

        # Every CFUNCTYPE object is kept on the instance: ggml holds raw pointers to them.
        lib = _buft_lib()
        self._buft_iface = abi.GgmlBackendBufferTypeI(
            get_name=abi.BUFT_GET_NAME(native.function_address(lib.smoe_buft_get_name)),
            alloc_buffer=abi.BUFT_ALLOC_BUFFER(self._alloc_buffer),
            get_alignment=abi.BUFT_GET_ALIGNMENT(native.function_address(lib.smoe_buft_get_alignment)),
            get_max_size=abi.BUFT_GET_MAX_SIZE(),  # NULL: SIZE_MAX
            get_alloc_size=abi.BUFT_GET_ALLOC_SIZE(),  # NULL: ggml_nbytes
            is_host=abi.BUFT_IS_HOST(native.function_address(lib.smoe_buft_is_host)),
        )
        self._buft_struct = abi.GgmlBackendBufferType(
            iface=self._buft_iface, device=abi.cpu_device(), context=ctypes.addressof(self._answers)
        )
        self.buft: int = ctypes.addressof(self._buft_struct)
        self._buffer_iface = abi.GgmlBackendBufferI(
            free_buffer=abi.BUF_FREE_BUFFER(self._free_buffer),
            get_base=abi.BUF_GET_BASE(self._get_base),
            init_tensor=abi.BUF_INIT_TENSOR(self._init_tensor),
            memset_tensor=abi.BUF_MEMSET_TENSOR(self._memset_tensor),
            set_tensor=abi.BUF_SET_TENSOR(self._set_tensor),
            get_tensor=abi.BUF_GET_TENSOR(self._get_tensor),
            set_tensor_2d=abi.BUF_SET_TENSOR_2D(),
            get_tensor_2d=abi.BUF_GET_TENSOR_2D(),
            cpy_tensor=abi.BUF_CPY_TENSOR(),
            clear=abi.BUF_CLEAR(self._clear),
            reset=abi.BUF_RESET(),
        )

    # ---------------------------------------------------------------- llama.cpp plumbing

    def tensor_buft_overrides(self, patterns: tuple[str, ...] = (archs.EXPERT_TENSOR_PATTERN,)) -> int:
        """Address of a NULL-terminated ``llama_model_tensor_buft_override`` array sending every
        tensor matching one of ``patterns`` to this X-Slot. The array lives as long as ``self``."""
        self._override_patterns = [p.encode() for p in patterns]
        arr = (abi.LlamaTensorBuftOverride * (len(patterns) + 1))()
        for i, p in enumerate(self._override_patterns):
            arr[i].pattern = p
            arr[i].buft = self.buft
        arr[len(patterns)].pattern = None
        arr[len(patterns)].buft = None
        self._override_array = arr
        return ctypes.addressof(arr)

    def finish_loading(self) -> None:
        """Call after ``llama_model_load_from_file`` returns (and before creating a context): the
        X-Slot tensors get their names back and from now on ``is_host`` answers true.

        With ``is_host`` still false, creating a context aborts the process (ggml: "pre-allocated
        tensor ... in a buffer (XSLOT) that cannot run the operation"); it also turns true by itself
        once every byte of every X-Slot tensor has been offered to ``set_tensor``.
        """
        if self.error is not None:
            raise SmoeError(self.error)
        self._restore_names()
        self.loading = False

    @property
    def hidden_tensors(self) -> int:
        """How many X-Slot tensors are hidden from llama.cpp's loader right now."""
        return len(self._hidden)

    def _restore_names(self) -> None:
        for tensor, (_buffer, name) in self._hidden.items():
            abi.ggml_set_name(tensor, name)
        self._hidden.clear()

    # ---------------------------------------------------------------- slices

    def slice_address(self, tensor_name: str, expert: int) -> int:
        return self.regions[tensor_name].slice_address(expert)

    @property
    def resident_bytes(self) -> int:
        """Logical bytes of resident (claimed) slices."""
        return sum(flags.count(1) * self.regions[name].slice_bytes for name, flags in self._resident.items())

    @property
    def file_mapped(self) -> bool:
        """Whether any slice is mapped from a file (:meth:`map_slice`)."""
        return bool(self._file_mapped)

    def flags_address(self, tensor_name: str) -> int:
        """Address of the tensor's resident flags (one byte per expert) for native code, which
        changes them only under :attr:`lock`."""
        return ctypes.addressof(self._flag_views[tensor_name])

    def is_resident(self, tensor_name: str, expert: int) -> bool:
        return bool(self._resident[tensor_name][expert])

    def fill_slice(self, tensor_name: str, expert: int, fill: Callable[[memoryview], object]) -> None:
        """Make a slice resident: ``fill(view)`` must write all of ``view`` (the slice's bytes).

        If ``fill`` raises, the pages it may have touched are released again and the slice stays
        non-resident, so the page accounting holds."""
        r = self.regions[tensor_name]
        s = r.slice_bytes
        self.claim_slice(tensor_name, expert)  # its pages first (see __init__)
        if self._populate:
            lo, hi = self._pages(r, expert)
            if abi.libc_madvise(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
                self._populate = False  # old kernel: let the copy fault the pages in
        try:
            fill(self._views[tensor_name][expert * s : (expert + 1) * s])
        except BaseException:
            self.evict_slice(tensor_name, expert)
            raise

    def claim_slice(self, tensor_name: str, expert: int) -> int:
        """Claim a slice that is about to be filled (as :meth:`fill_slice` does) and return its
        address: the caller writes all of its bytes, or :meth:`evict_slice` s it on failure."""
        r = self.regions[tensor_name]
        flags = self._resident[tensor_name]
        with self.lock:
            if not flags[expert]:
                flags[expert] = 1
        return r.slice_address(expert)

    def load_slice(self, tensor_name: str, expert: int, fd: int, file_offset: int) -> None:
        """Copy slice ``expert`` of ``tensor_name`` from ``fd`` at ``file_offset`` (the slice's bytes)."""

        def read(view: memoryview) -> None:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], file_offset + done)
                if n <= 0:
                    raise SmoeError(f"X-Slot: short read for {tensor_name}[{expert}] at offset {file_offset + done}")
                done += n

        self.fill_slice(tensor_name, expert, read)

    def map_slice(self, tensor_name: str, expert: int, fd: int, file_offset: int) -> None:
        """Zero-copy variant of :meth:`load_slice`: map the file's bytes over the slice
        (``MAP_PRIVATE | MAP_FIXED``, populated). The slice must start and end on page boundaries
        and ``file_offset`` must be a page multiple. The pages are the file's page-cache pages
        (``mincore`` reports their cache residency); each mapped slice is one VMA of the process
        (``vm.max_map_count``, 65530 by default, bounds how many can be mapped at once); the file
        must not be truncated while mapped (SIGBUS)."""
        r = self.regions[tensor_name]
        address, s = r.slice_address(expert), r.slice_bytes
        if address % PAGE or s % PAGE or file_offset % PAGE:
            raise SmoeError(
                f"X-Slot: {tensor_name}[{expert}] cannot be mapped: slice {s} bytes at file offset "
                f"{file_offset} is not page-aligned (use load_slice)"
            )
        got = abi.libc_mmap(address, s, _PROT_RW, mmap.MAP_PRIVATE | _MAP_FIXED, fd, file_offset)
        if got != address:
            raise SmoeError(f"X-Slot: mmap of {tensor_name}[{expert}] failed: {os.strerror(ctypes.get_errno())}")
        if _MADV_POPULATE_READ is not None:
            # read-populate: map the page-cache pages now, without copying them (MAP_POPULATE on a
            # writable private mapping write-faults, i.e. copies every page: no faster than load_slice)
            abi.libc_madvise(address, s, _MADV_POPULATE_READ)
        flags = self._resident[tensor_name]
        with self.lock:
            self._file_mapped.add((tensor_name, expert))
            if not flags[expert]:
                flags[expert] = 1

    def evict_slice(self, tensor_name: str, expert: int) -> None:
        """Give the pages of a slice back to the system, all but boundary pages a resident neighbour uses."""
        self.evict_slices(tensor_name, [expert])

    def evict_slices(self, tensor_name: str, experts: Iterable[int]) -> None:
        """:meth:`evict_slice` for several slices of one tensor, with one fresh mapping per run of
        neighbouring pages they free (a prompt taken part by part lets a layer's stage go at once)."""
        flags = self._resident[tensor_name]
        with self.lock:
            gone = [e for e in sorted(set(experts)) if flags[e]]
            if not gone:
                return
            r = self.regions[tensor_name]
            for e in gone:
                flags[e] = 0
                self._file_mapped.discard((tensor_name, e))
                self._moved_in.discard((tensor_name, e))
            spans: list[list[int]] = []
            for e in gone:  # freed against the flags with all of them gone: shared pages go too
                lo, hi = self._free_span(r, flags, e)
                if lo >= hi:
                    continue
                if spans and lo <= spans[-1][1]:
                    spans[-1][1] = max(spans[-1][1], hi)
                else:
                    spans.append([lo, hi])
            for lo, hi in spans:
                _map_anon(lo, hi - lo, fixed=True)

    def move_slice(self, tensor_name: str, expert: int, to_tensor: str, to_expert: int) -> int:
        """Evict slice ``expert`` of ``tensor_name`` and give its pages to slice ``to_expert`` of
        ``to_tensor``, which is not resident and is about to be filled: the fill then writes into
        pages already there, with no release, no fault and no zero-fill. Returns the bytes moved.

        The destination is claimed at once (as :meth:`fill_slice` claims it), so the pages are
        accounted to it: fill it, or :meth:`evict_slice` it, which releases them. The physically
        resident pages are therefore always those touched by claimed slices (module doc). Pages
        move only between page-aligned slices of the same size (no page is shared with a
        neighbour). Each slice holding moved pages is a mapping of its own (a VMA: the kernel's
        ``vm.max_map_count`` bounds them), so at most :data:`MAX_MOVED_SLICES` do at once. Otherwise,
        and where pages cannot be moved (not Linux, a kernel without ``MREMAP_DONTUNMAP``, a slice
        mapped from a file, a destination already claimed), the slice is evicted and 0 returned."""
        src, dst = self.regions[tensor_name], self.regions[to_tensor]
        flags, to_flags = self._resident[tensor_name], self._resident[to_tensor]
        size = src.slice_bytes
        lo, to = src.slice_address(expert), dst.slice_address(to_expert)
        movable = (self.can_move and size == dst.slice_bytes and size % PAGE == 0 and lo % PAGE == 0
                   and to % PAGE == 0 and (tensor_name, expert) != (to_tensor, to_expert))
        with self.lock:
            if not flags[expert]:
                return 0
            moved = 0
            if (movable and not to_flags[to_expert] and (tensor_name, expert) not in self._file_mapped
                    and len(self._moved_in) < MAX_MOVED_SLICES):
                # MREMAP_DONTUNMAP leaves the source range mapped (empty): no other mmap can land there
                if _mremap(lo, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP, to) == to:
                    moved = size
                    _map_anon(lo, size, fixed=True)  # a fresh mapping there, one that merges with its neighbours
                elif ctypes.get_errno() == errno.EINVAL:
                    self.can_move = False  # a kernel without MREMAP_DONTUNMAP: evict from now on
            flags[expert] = 0
            self._file_mapped.discard((tensor_name, expert))
            self._moved_in.discard((tensor_name, expert))
            if not moved:
                lo, hi = self._free_span(src, flags, expert)
                if lo < hi:
                    _map_anon(lo, hi - lo, fixed=True)
                return 0
            to_flags[to_expert] = 1
            self.moved_bytes += size
            self._moved_in.add((to_tensor, to_expert))
            return size

    def evict_all(self) -> None:
        for name, flags in self._resident.items():
            self.evict_slices(name, range(len(flags)))

    @staticmethod
    def _pages(r: Region, expert: int) -> tuple[int, int]:
        start = r.slice_address(expert)
        end = start + r.slice_bytes
        return start - start % PAGE, -(-end // PAGE) * PAGE

    def _free_span(self, r: Region, flags: bytearray, expert: int) -> tuple[int, int]:
        s = r.slice_bytes
        lo, hi = self._pages(r, expert)
        start = r.slice_address(expert)
        if lo < start:  # first page holds the tail of earlier slices
            first = max(0, (lo - r.address) // s)
            if any(flags[first:expert]):
                lo += PAGE
        if start + s < hi:  # last page holds the head of later slices (or tensor padding)
            last = min(r.n_expert - 1, (hi - 1 - r.address) // s)
            if any(flags[expert + 1 : last + 1]):
                hi -= PAGE
        return lo, hi

    # ---------------------------------------------------------------- accounting

    def resident_page_bytes(self) -> int:
        """Bytes of the pages touched by resident slices (what the kernel should report)."""
        pages: set[int] = set()
        for name, flags in self._resident.items():
            r = self.regions[name]
            for e in range(r.n_expert):
                if flags[e]:
                    lo, hi = self._pages(r, e)
                    pages.update(range(lo, hi, PAGE))
        return len(pages) * PAGE

    def page_slack_bound(self, n_slices: int, slice_bytes: int) -> int:
        """Upper bound of (page bytes - logical bytes) for ``n_slices`` resident slices of ``slice_bytes``."""
        per_slice = (-(-slice_bytes // PAGE) + 1) * PAGE - slice_bytes
        return n_slices * per_slice

    def mincore_bytes(self) -> int:
        """Resident bytes of all X-Slot buffers as the kernel reports them (``mincore``)."""
        total = 0
        for base, size in self.buffers.values():
            n_pages = -(-size // PAGE)
            vec = (ctypes.c_uint8 * n_pages)()
            if abi.libc_mincore(base, n_pages * PAGE, vec) != 0:
                raise SmoeError(f"X-Slot: mincore failed: {os.strerror(ctypes.get_errno())}")
            total += int(np.count_nonzero(np.ctypeslib.as_array(vec) & 1))
        return total * PAGE

    # ---------------------------------------------------------------- ggml callbacks

    @property
    def loading(self) -> bool:
        """True until the model is loaded: llama.cpp's loader is kept away from the X-Slot's bytes,
        and the buffer type answers that it is not host memory (see :meth:`finish_loading`)."""
        return not self._answers.is_host

    @loading.setter
    def loading(self, on: bool) -> None:
        self._answers.is_host = 0 if on else 1  # read by _xslot_buft.c on llama.cpp's threads

    @property
    def huge_pages(self) -> bool:
        """Whether the buffers ask for transparent huge pages: only where nothing will be evicted
        (a budget that holds every leaf), since a slice's pages are then never released one by
        one. Set before the model loads; switching it off advises the buffers against them from
        then on (their slices are released and moved in small pages)."""
        return self._huge_pages

    @huge_pages.setter
    def huge_pages(self, on: bool) -> None:
        if on and self.buffers:
            raise SmoeError("X-Slot: huge pages are chosen before the buffers are allocated")
        if self._huge_pages and not on and _NOHUGEPAGE is not None:
            for base, size in self.buffers.values():
                abi.libc_madvise(base, size, _NOHUGEPAGE)  # takes back their MADV_HUGEPAGE, in any mode
        self._huge_pages = on

    def _alloc_buffer(self, buft: int, size: int) -> int:
        try:
            reserve = -(-size // PAGE) * PAGE
            base = _map_anon(0, reserve, fixed=False, huge=self._huge_pages)
            buf = abi.ggml_backend_buffer_init(self.buft, self._buffer_iface, None, size)
            if not buf:
                abi.libc_munmap(base, reserve)
                return 0
            self.buffers[int(buf)] = (base, reserve)
            return int(buf)
        except Exception as e:  # noqa: BLE001 - must not cross into C; NULL makes llama.cpp fail loudly
            print(f"smoe-gguf X-Slot: alloc_buffer({size}) failed: {e}", file=sys.stderr)
            return 0

    def _free_buffer(self, buffer: int) -> None:
        base, size = self.buffers.pop(buffer)
        for tensor in [t for t, (b, _) in self._hidden.items() if b == buffer]:
            del self._hidden[tensor]  # a failed load: the tensor may be gone with its buffer
        for name in [n for n, r in self.regions.items() if base <= r.address < base + size]:
            del self._flag_views[name]
            self._resident.pop(name)
            self._region_bytes -= self.regions[name].nbytes
            del self.regions[name]
            del self._views[name]
            self._forget_pages(name)
        abi.libc_munmap(base, size)

    def _forget_pages(self, name: str) -> None:
        """No slice of tensor ``name`` is mapped from a file or holds moved pages any more."""
        self._file_mapped = {k for k in self._file_mapped if k[0] != name}
        self._moved_in = {k for k in self._moved_in if k[0] != name}

    def _get_base(self, buffer: int) -> int:
        return self.buffers[buffer][0]

    def _init_tensor(self, buffer: int, tensor: int) -> int:
        t = abi.tensor_at(tensor)
        if t.view_src:
            return abi.GGML_STATUS_SUCCESS
        name = t.name.decode()
        ne = tuple(t.ne)
        nb = tuple(t.nb)
        d = abi.GGML_MAX_DIMS - 1
        while d > 0 and ne[d] == 1:
            d -= 1
        nbytes = abi.ggml_nbytes(tensor)
        r = Region(name, int(t.data), nbytes, ne, nb, ne[d], nb[d], tensor)  # type: ignore[arg-type]
        # Refusing a tensor fails the allocation, and llama.cpp fails the load with an error.
        if r.slice_bytes * r.n_expert != r.nbytes:
            self.error = f"X-Slot: tensor {name} is not {r.n_expert} contiguous expert slices"
            return abi.GGML_STATUS_FAILED
        if r.address % PAGE:  # the page accounting assumes no page is shared between tensors
            self.error = f"X-Slot: tensor {name} does not start on a page boundary"
            return abi.GGML_STATUS_FAILED
        self.regions[name] = r
        self._region_bytes += nbytes
        self._resident[name] = bytearray(r.n_expert)
        self._flag_views[name] = (ctypes.c_uint8 * r.n_expert).from_buffer(self._resident[name])
        self._views[name] = memoryview((ctypes.c_uint8 * nbytes).from_address(r.address)).cast("B")
        if self.loading:  # keep the loader away from its bytes (module doc); finish_loading restores it
            self._hidden[tensor] = (buffer, name.encode())
            abi.ggml_set_name(tensor, b"%s%d" % (HIDDEN_PREFIX, len(self._hidden)))
        return abi.GGML_STATUS_SUCCESS

    def _set_tensor(self, buffer: int, tensor: int, data: int, offset: int, size: int) -> None:
        if self.loading:
            self.offered_bytes += size  # llama.cpp's copy of the experts: counted, not copied
            if self.offered_bytes >= self._region_bytes:
                self.loading = False
            return
        ctypes.memmove(abi.tensor_at(tensor).data + offset, data, size)

    def _get_tensor(self, buffer: int, tensor: int, data: int, offset: int, size: int) -> None:
        ctypes.memmove(data, abi.tensor_at(tensor).data + offset, size)

    def _memset_tensor(self, buffer: int, tensor: int, value: int, offset: int, size: int) -> None:
        ctypes.memset(abi.tensor_at(tensor).data + offset, value, size)

    def _clear(self, buffer: int, value: int) -> None:
        base, size = self.buffers[buffer]
        if value == 0:  # fresh anonymous pages are zero: clearing also releases the memory
            _map_anon(base, size, fixed=True, huge=self._huge_pages)
            for name, r in self.regions.items():
                if base <= r.address < base + size:
                    flags = self._resident[name]
                    flags[:] = bytes(len(flags))
                    self._forget_pages(name)
        else:
            ctypes.memset(base, value, size)
