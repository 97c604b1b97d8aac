"""The native read pool: parallel part reads land exactly, in place where aligned, checked by the
workers; and the pager that uses it stays bit-exact while misses, prefetches, evictions and
cancellations race on a budget of a few leaves."""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf import residency
from smoe_gguf.budget import page_cost
from smoe_gguf.engine import Engine
from smoe_gguf.errors import SmoeError
from smoe_gguf.pack import manifest as mf
from smoe_gguf.readpool import MISMATCH, SHORT, Read, ReadPool, xxh64
from smoe_gguf.store import LeafStore, PartLoc

from .engine_helpers import N_TOKENS, PROMPT, reference, same


def _aligned(n: int) -> tuple[ctypes.Array, int]:
    raw = (ctypes.c_uint8 * (n + 8192))()
    base = ctypes.addressof(raw)
    return raw, base + (-base % 4096)


def _shard(tmp_path: Path, seed: int, size: int, direct: bool = False) -> tuple[bytes, int, bool]:
    """A file of ``size`` random bytes: its bytes, a descriptor open on it, and whether that
    descriptor reads with O_DIRECT (``direct`` asks for it; where the filesystem has none, such
    as tmpfs, it is opened buffered)."""
    data = np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes()
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return data, os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    return data, os.open(path, os.O_RDONLY), False


def test_reads_land_exactly_in_place_or_bounced_and_wrong_bytes_are_caught(tmp_path: Path) -> None:
    data, fd, direct = _shard(tmp_path, 0, 1 << 20, direct=True)
    cases = [(0, 8192), (4096, 5000), (123, 777), (8192, 1), (0, len(data))]  # (offset, length)
    raw, base = _aligned(4 * len(data))
    dests = [base, base + len(data) + 8, base + 2 * len(data) + 4096, base + 3 * len(data) - 8192, base]
    pool = ReadPool(3)
    try:
        for (off, n), dest in zip(cases, dests, strict=True):
            guard = ctypes.string_at(dest - 8, 8) if dest > base else b""
            after = ctypes.string_at(dest + n, 8)
            digest = hashlib.sha256(data[off:off + n]).digest()
            [out] = pool.run([Read(fd, direct, off, n, dest, digest)], urgent=True)
            assert out.status == 0, out.error()
            assert ctypes.string_at(dest, n) == data[off:off + n]
            assert ctypes.string_at(dest + n, 8) == after and (not guard or ctypes.string_at(dest - 8, 8) == guard)
            if direct:
                assert out.in_place == (off % 4096 == 0 and dest % 4096 == 0 and n >= 4096)
        bad, short = pool.run([Read(fd, direct, 0, 4096, base, b"\0" * 32),
                               Read(fd, direct, len(data) - 100, 200, base + 8192, None)], urgent=False)
        assert (bad.status, short.status) == (MISMATCH, SHORT)
        assert (bad.error(), short.error()) == ("checksum mismatch", "truncated")
    finally:
        pool.close()
        os.close(fd)


def test_a_leafs_parts_are_read_with_one_preadv_and_a_failing_part_is_still_named(tmp_path: Path) -> None:
    part = 3 * 4096
    data, fd, direct = _shard(tmp_path, 1, 10 * part + 100, direct=True)
    raw, base = _aligned(12 * part)
    dests = [base + 4 * i * part for i in range(3)]  # apart in memory, as an X-Slot's parts are

    def leaf(first: int, xxh: list[int | None]) -> list[Read]:
        return [Read(fd, direct, (first + i) * part, part, dests[i], None, xxh[i]) for i in range(3)]

    def right(first: int) -> list[int | None]:
        return [xxh64(data[(first + i) * part:(first + i + 1) * part]) for i in range(3)]

    pool = ReadPool(2)
    try:
        outs = pool.run(leaf(2, right(2)), urgent=True)
        assert [o.status for o in outs] == [0, 0, 0] and pool.chains == 1
        assert all(ctypes.string_at(dests[i], part) == data[(2 + i) * part:(3 + i) * part] for i in range(3))
        assert [o.in_place for o in outs] == [direct] * 3 and [o.bytes_read for o in outs] == [part] * 3
        wrong = right(5)
        wrong[1] ^= 1
        assert [o.status for o in pool.run(leaf(5, wrong), urgent=False)] == [0, MISMATCH, 0]
        # the last part runs past the end of the file: the chain is read again part by part
        outs = pool.run(leaf(8, [None, None, None]), urgent=True)
        assert [o.status for o in outs] == [0, 0, SHORT] and pool.chains == 3
        assert ctypes.string_at(dests[1], part) == data[9 * part:10 * part]
    finally:
        pool.close()
        os.close(fd)


def test_background_reads_leave_a_thread_and_most_of_the_disk_to_urgent_ones(tmp_path: Path) -> None:
    """A pool of n workers runs n + 1 threads and never more than n background reads at once, of at
    most half a MiB per worker together (one read always may start): a gate's urgent read neither
    waits behind prefetch reads under way nor shares the disk with more than that; all reads land.
    Each background call here is one 1 MiB read (its 16 parts follow each other: one chain), so a
    pool of 2 (1 MiB) reads one at a time and a pool of 4 (2 MiB) two; a pool of 2 told to let two
    entries run whatever their bytes reads at most two (the setting is clamped to the workers)."""
    import threading

    data, fd, _direct = _shard(tmp_path, 1, 1 << 20)
    raw, base = _aligned(8 * len(data))
    chunk = len(data) // 16

    def submit(pool: ReadPool, failures: list[int], slot: int, urgent: bool) -> None:
        for _ in range(8):
            reads = [Read(fd, False, i * chunk, chunk, base + slot * len(data) + i * chunk, None) for i in range(16)]
            failures.extend(o.status for o in pool.run(reads, urgent) if o.status)

    try:
        for workers, entries, most in ((2, 1, 1), (4, 1, 2), (2, 2, 2)):
            pool = ReadPool(workers)
            try:
                assert (pool.workers, pool.threads, pool.peak_background, pool.background_cap) == (
                    workers, workers + 1, 0, workers << 19)
                assert pool.set_background_entries(entries + 5) == workers  # at most one per worker
                assert pool.set_background_entries(0) == 1
                assert pool.set_background_entries(entries) == entries
                failures: list[int] = []
                threads = [threading.Thread(target=submit, args=(pool, failures, k, k == 0)) for k in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert not failures
                assert all(ctypes.string_at(base + k * len(data), len(data)) == data for k in range(4))
                assert 1 <= pool.peak_background <= most
            finally:
                pool.close()
    finally:
        os.close(fd)


def test_a_caller_reads_its_own_urgent_reads_that_no_worker_has_taken(tmp_path: Path) -> None:
    """The thread waiting for an urgent call reads the call's jobs still queued itself (a gate's
    lone miss: no worker to wake, no wake-up back). With every worker held, an urgent call still
    completes, each byte in place, every read counted as the caller's; a background call's reads
    are left to the workers."""
    data, fd, _direct = _shard(tmp_path, 2, 1 << 16)
    raw, base = _aligned(2 * len(data))
    pool = ReadPool(2)
    try:
        pool.hold(True, urgent=True)  # the workers take no read at all
        chunk = len(data) // 4
        reads = [Read(fd, False, i * chunk, chunk, base + i * chunk, None) for i in (0, 2, 1, 3)]
        outcomes = pool.run(reads, urgent=True)
        assert [o.status for o in outcomes] == [0] * 4
        assert ctypes.string_at(base, len(data)) == data
        assert pool.caller_jobs == 4
        pool.hold(False)
        for _ in range(3):
            assert [o.status for o in pool.run(reads, urgent=False)] == [0] * 4  # background: the workers'
        assert pool.caller_jobs == 4
    finally:
        pool.close()
        os.close(fd)


def test_a_lone_urgent_read_wakes_no_worker(tmp_path: Path) -> None:
    """A call of one urgent read (a gate's lone miss) is read by the thread that waits for it: no
    worker is woken for it, so none wakes to find it gone."""
    data, fd, _direct = _shard(tmp_path, 3, 1 << 16)
    raw, base = _aligned(len(data))
    pool = ReadPool(2)
    try:
        for _ in range(20):
            assert [o.status for o in pool.run([Read(fd, False, 0, len(data), base, None)], urgent=True)] == [0]
        assert ctypes.string_at(base, len(data)) == data
        assert (pool.caller_jobs, pool.idle_wakes) == (20, 0)
    finally:
        pool.close()
        os.close(fd)


def test_a_batch_of_parts_is_read_at_once_and_the_failing_part_is_named(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 64  # 16 KiB
    shard = tmp_path / "leaves.bin"
    shard.write_bytes(blob)
    good = hashlib.sha256(blob[:4096]).hexdigest()
    leaves = {(0, e): [PartLoc("t", "gate", 0, shard, 4096 * e, 4096, good if e == 0 else None)] for e in range(3)}
    leaves[(0, 3)] = [PartLoc("t", "up", 0, shard, 12288, 8192, None)]  # runs past the end
    store = LeafStore(leaves, io_depth=2)
    raw, base = _aligned(5 * 4096)
    try:
        assert store.read_parts([(0, e, 0, base + 4096 * e) for e in range(3)]) >= 3 * 4096
        assert ctypes.string_at(base, 3 * 4096) == blob[:3 * 4096]
        assert store.stats.checked_parts == 1 and store.stats.batches == 1
        with pytest.raises(SmoeError, match=r"layer 0 expert 3 part up: shard .*leaves.bin is truncated"):
            store.read_parts([(0, 0, 0, base), (0, 3, 0, base + 4096)])
    finally:
        store.close()


def test_xxh64_matches_the_reference_vectors() -> None:
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    assert xxh64(bytes(range(100))) == xxh64(bytearray(range(100))) == xxh64(memoryview(bytes(range(100))))


def test_the_fast_checksum_is_what_a_first_read_checks_where_the_pack_has_it(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 16  # 4 KiB
    shard = tmp_path / "leaf.bin"
    shard.write_bytes(blob)
    sha = hashlib.sha256(blob).hexdigest()
    right = PartLoc("t", "gate", 0, shard, 0, 4096, sha, xxh64(blob))
    wrong = PartLoc("t", "gate", 0, shard, 0, 4096, sha, xxh64(blob) ^ 1)  # sha256 right, xxh64 not
    raw, base = _aligned(4096)
    store = LeafStore({(0, 0): [right], (0, 1): [wrong]})
    try:
        store.read_parts([(0, 0, 0, base)])
        assert store.stats.checked_parts == 1
        with pytest.raises(SmoeError, match="layer 0 expert 1 part gate: checksum mismatch"):
            store.read_parts([(0, 1, 0, base)])
    finally:
        store.close()


def test_decoded_tokens_prefetch_two_leaves_at_once_with_speculation_prompts_one_and_a_fill_all(
        pack_of, monkeypatch: pytest.MonkeyPatch) -> None:
    """With speculation, the reader pool lets two prefetched leaves be read at once while tokens
    are decoded (engine.DECODE_PREFETCH_LEAVES) and one while a prompt is, set only when that
    changes; without speculation the pool keeps its default of one. A budget that holds every
    leaf lets every reader read its fill, from the first prompt on."""
    calls: list[int] = []
    real = LeafStore.set_background_entries
    monkeypatch.setattr(LeafStore, "set_background_entries", lambda self, n: calls.append(n) or real(self, n))
    pack = pack_of("qwen3moe", "q4_k")
    for budget, speculate, want in (("25%", True, [2, 1, 2]), ("25%", False, []), ("100%", True, [3]),
                                    ("100%", False, [3])):
        calls.clear()
        with Engine(pack, budget=budget, n_ctx=256, n_threads=2, profile=None, speculate=speculate, io_depth=3) as eng:
            assert eng.paging == (budget != "100%")
            for prompt in (PROMPT, " And then"):
                eng.generate(prompt, 4)
        assert calls == want


def test_a_closed_pool_says_so(tmp_path: Path) -> None:
    """Every call on a closed pool raises the same error instead of touching freed memory."""
    data, fd, _direct = _shard(tmp_path, 4, 4096)
    raw, base = _aligned(len(data))
    pool = ReadPool(1)
    pool.close()
    try:
        for call in (lambda: pool.run([Read(fd, False, 0, len(data), base, None)], urgent=True),
                     lambda: pool.hold(True), lambda: pool.set_background_entries(2),
                     lambda: pool.caller_jobs, lambda: pool.idle_wakes, lambda: pool.address):
            with pytest.raises(SmoeError, match="the read pool is closed"):
                call()
    finally:
        os.close(fd)


def test_io_depth_out_of_range_is_refused() -> None:
    with pytest.raises(SmoeError, match="io depth must be 1 to 64"):
        ReadPool(0)


@pytest.mark.parametrize("dtype,pipeline", [("f32", False), ("q4_k", False), ("f32", True)])
def test_stress_misses_prefetches_evictions_and_cancellations_race_bit_exact(tiny_model, pack_of, dtype: str,
                                                                             pipeline: bool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of a few leaves over the least that runs, speculation and the tree-map on, reads
    four at a time: every token and logit equals stock llama.cpp's, the budget holds throughout,
    and the races really happened (prefetches evicted, cancelled, or waited for by a gate).
    Without pipelining the native pager serves misses meanwhile: releasing pages next to slices
    being filled (F32: slices share boundary pages) or moving them (Q4_K: whole pages)."""
    src, pack = tiny_model("qwen3moe", dtype), pack_of("qwen3moe", dtype)
    m = mf.load(pack)
    leaf = max(sum(page_cost(p.length) for p in lf.parts) for lf in m.leaves)
    budget = (m.n_expert_used + 3) * leaf
    monkeypatch.setattr(residency, "READ_COST", 0.0)  # every guess is prefetched, whatever the budget's regret
    # the prompt token by token (whole leaves), as decode goes: the races are decode's
    with Engine(pack, budget=budget, n_ctx=256, n_threads=2, profile=None, io_depth=4, pipeline=pipeline,
                n_ubatch=1) as eng:
        eng.observer_switch.keep(True)  # speculation on at every token
        gen = eng.generate(PROMPT, N_TOKENS, keep_logits=True)
        assert same(reference(src, eng), gen.tokens, gen.logits)
        r = eng.residency.stats
        assert r.peak_bytes <= eng.budget and eng.xslot.mincore_bytes() <= eng.budget
        assert r.evictions > 0 and r.prefetched > 0
        assert r.prefetch_wasted + r.prefetch_cancelled + r.late > 0
        st = eng.source.store.stats
        assert st.in_place_reads > 0 or not eng.source.store.direct_io_used
        assert (r.native_gates > 0) == (not pipeline)
