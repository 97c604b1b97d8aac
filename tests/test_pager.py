"""The native pager (``_pager.c``): misses served in C, bit-exact, in budget, the same choices as
the Python residency, and failures handed back to Python, which names them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from smoe_gguf import native, pager, residency
from smoe_gguf.engine import Engine
from smoe_gguf.fetcher import (
    DOWN,
    HOLD_BELOW,
    LOADING,
    QUEUED,
    TABLE_FAILED,
    TABLE_LOADING,
    TABLE_NATIVE,
    TABLE_OTHER,
    TABLE_QUEUED,
    TABLE_TAKEN,
    Fetcher,
    Flight,
)
from smoe_gguf.pack.split import split
from smoe_gguf.policy import POLICIES, AccessState
from smoe_gguf.replay import replay
from smoe_gguf.trace import load

from .engine_helpers import N_TOKENS, PROMPT, budgets, corrupted_pack, reference, same


def _run(pack: Path, budget: str, prompt: str = PROMPT, **kw: object) -> tuple[Engine, list[int], list[np.ndarray], list[int]]:
    """Generate with an engine that measures ``mincore`` at every gate (an observer: called at
    each top-k gate, before the gate's misses are served) and after every token."""
    kw.setdefault("n_threads", 2)
    eng = Engine(pack, budget=budget, n_ctx=256, profile=None, speculate=False, **kw)
    seen: list[int] = []
    eng.gate.observe(lambda _layer, _t, _ids: seen.append(eng.xslot.mincore_bytes()))
    eng.gate.observing = True
    if eng.residency.native is not None:
        eng.residency.native.wait_opened()  # every shard open: no first miss left to Python for that
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    for step in eng.stream(prompt, N_TOKENS, keep_logits=True):
        tokens.append(step.token)
        logits.append(step.logits)
        seen.append(eng.xslot.mincore_bytes())
    return eng, tokens, logits, seen


@pytest.mark.parametrize("dtype", ["f32", "q4_k"])
def test_misses_are_served_in_c_bit_exact_and_in_budget(dtype: str, pack_of, tiny_model) -> None:
    """Q4_K slices are whole pages (the victims' pages move to the misses); F32 slices are not
    (released, boundary pages kept while a neighbour is resident)."""
    eng, tokens, logits, seen = _run(pack_of("qwen3moe", dtype), "25%")
    with eng:
        st = eng.stats()
        # Python serves only the prompt's gates whose leaves its read-ahead has in flight
        assert st.gates_with_misses_native > 2 * st.gates_with_misses_python
        assert st.misses > 0 and st.evictions > 0 and st.bytes_read > 0
        assert max(seen) <= eng.budget and st.peak_resident_bytes <= eng.budget
        assert max(seen) > eng.budget // 2  # the measure sees real pages
        assert eng.xslot.mincore_bytes() == eng.xslot.resident_page_bytes()  # every page is a resident slice's
        recycles = dtype == "q4_k" and eng.xslot.can_move
        assert (st.pages_moved_bytes > 0) == recycles
        assert same(reference(tiny_model("qwen3moe", dtype), eng), tokens, logits)


def _xslot_mappings(eng: Engine) -> int:
    """How many of this process's mappings (VMAs) lie in the X-Slot's tensors."""
    spans = [(r.address, r.address + r.nbytes) for r in eng.xslot.regions.values()]
    n = 0
    with open("/proc/self/maps", encoding="ascii") as f:
        for line in f:
            lo = int(line.split("-", 1)[0], 16)
            n += any(a <= lo < b for a, b in spans)
    return n


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux: pages move with mremap")
@pytest.mark.parametrize("bounded", [True, False])
def test_a_slice_emptied_by_a_move_stays_a_mapping_of_its_own_only_while_all_of_them_stay_bounded(
        bounded: bool, pack_of, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where every paged slice being a mapping of its own stays below the bound, a slice whose
    pages moved out is left as it is (no fresh mapping to merge it back); past the bound it is
    merged back. Either way the output is bit-exact, the budget holds, every page is a resident
    slice's, and the X-Slot's mappings stay within the slices."""
    if not bounded:  # as for a model of more slices than the bound
        monkeypatch.setattr(pager.NativePager, "_all_slices_bounded", lambda self: False)
    eng, tokens, logits, seen = _run(pack_of("qwen3moe", "q4_k"), "25%")
    with eng:
        nat = eng.residency.native
        assert nat is not None and eng.xslot.can_move and eng.stats().pages_moved_bytes > 0
        assert nat._st.merge_emptied == (not bounded)
        slices = sum(r.n_expert for r in eng.xslot.regions.values())
        mappings = _xslot_mappings(eng)
        assert mappings <= slices + len(eng.xslot.regions)
        if not bounded:  # merged back: only the slices holding moved pages are their own
            assert mappings <= 2 * eng.budget // min(r.slice_bytes for r in eng.xslot.regions.values()) + 3 * len(eng.xslot.regions)
        assert max(seen) <= eng.budget and eng.xslot.mincore_bytes() == eng.xslot.resident_page_bytes()
        assert same(reference(tiny_model("qwen3moe", "q4_k"), eng), tokens, logits)


def all_sources(by_source: dict[str, dict[str, float]]) -> dict[str, float]:
    """Prefetch counts summed over their askers."""
    return {k: sum(c[k] for c in by_source.values()) for k in next(iter(by_source.values()))}


def test_prefetches_still_queued_are_taken_by_the_native_pager(pack_of, tiny_model,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No prefetch ever starts here (the I/O threads are held), so every prefetched leaf a gate
    needs is still queued: the native pager takes it from the I/O threads and reads it with the
    gate's misses, where Python did (the control: a miss in flight sends the gate to Python). Both
    make the same choices (hits, misses, evictions, bytes, prefetches taken and cancelled), the
    books balance (every queued prefetch was taken, cancelled or is still queued, and charged
    once), the budget holds and the output is bit-exact."""
    monkeypatch.setattr(Fetcher, "_next_prefetch", lambda self: False)
    monkeypatch.setattr(residency, "READ_COST", 0.0)  # every guess is prefetched: many reach a gate queued
    pack = pack_of("qwen3moe", "q4_k")
    figures, python_gates = [], []
    for serve_flights in (True, False):
        with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate=True,
                    speculate_native=False) as eng:
            r = eng.residency
            assert r.native is not None
            r.native.serve_flights = serve_flights
            r.native_prefetches = False  # prefetches on the I/O threads of the Python residency (held)
            r.native.wait_opened()
            eng.observer_switch.keep(True)  # speculation in every turn, whatever its timing
            tokens: list[int] = []
            logits: list[np.ndarray] = []
            for step in eng.stream(PROMPT, N_TOKENS, keep_logits=True):
                tokens.append(step.token)
                logits.append(step.logits)
                assert eng.xslot.mincore_bytes() <= eng.budget
            r.drain_native()
            st = eng.stats()
            counts = all_sources(st.prefetch_by_source)  # speculation and the first layer's guess from the token
            assert counts["used"] == counts["late"] == 0  # nothing ever landed
            assert counts["queued"] == counts["claimed"] + counts["cancelled"] + len(r.fetcher)
            queued_cost = sum(r.leaf_cost(k[0]) for k in r.fetcher.flight)
            resident_cost = sum(r.leaf_cost(int(k[0])) for k in zip(*np.nonzero(r.state.resident)))
            assert r.used == resident_cost + queued_cost <= eng.budget
            figures.append((tokens, st.hits, st.misses, st.evictions, st.bytes_read, counts))
            python_gates.append(st.gates_with_misses_python)
            assert same(reference(tiny_model("qwen3moe", "q4_k"), eng), tokens, logits)
    assert figures[0] == figures[1] and figures[0][-1]["claimed"] > 0
    assert python_gates[0] < python_gates[1]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_native_pager_chooses_as_the_python_residency_does(policy: str, pack_of) -> None:
    """The same misses, evictions and bytes with every miss served in C as in Python (a prompt
    too short for the read-ahead, whose landings would make the two runs differ in timing)."""
    figures, stamps = [], []
    for on in (True, False):
        eng, tokens, _logits, _seen = _run(pack_of("qwen3moe", "q4_k"), "25%", "Once upon", policy=policy, native=on)
        with eng:
            st = eng.stats()
            assert (st.gates_with_misses_native > 0) == on
            figures.append((tokens, st.hits, st.misses, st.evictions, st.bytes_read))
            state = eng.residency.state
            stamps.append((state.last_use.copy(), state.uses.copy(), state.freq.copy()))
    assert figures[0] == figures[1]
    assert all(np.array_equal(a, b) for a, b in zip(stamps[0][:2], stamps[1][:2]))
    np.testing.assert_allclose(stamps[0][2], stamps[1][2], rtol=1e-12)


def test_a_prompt_in_micro_batches_evicts_as_lfru_does_in_a_prompt_in_c_python_and_replay(pack_of, tmp_path: Path) -> None:
    """Below a layer's leaves a prompt goes in micro-batches (here of whole leaves: no more tokens
    than fit so); while it is gated lfru evicts in layer order (policy.py). C and Python choose
    alike, and the trace replays the live run's hits exactly, flags and all; without the flags the
    replay differs (the flag matters here)."""
    pack = pack_of("qwen3moe", "q4_k")
    with Engine(pack, budget="15%", n_ctx=256, n_threads=2, profile=None) as eng:
        whole = eng.budget // eng.min_budget  # the most tokens whose leaves fit whole
    figures, traces = [], []
    for on in (True, False):
        trace = tmp_path / f"t{on}.jsonl"
        with Engine(pack, budget="15%", n_ctx=256, n_threads=2, profile=None, n_ubatch=whole,
                    speculate=False, native=on, trace=str(trace), policy="lfru") as eng:
            assert 1 < eng.n_ubatch < len(eng.tokenize(PROMPT)) and not eng.residency.split_prompts
            if eng.residency.native is not None:
                eng.residency.native.wait_opened()
            tokens = eng.generate(PROMPT, 8).tokens
            st = eng.stats()
            assert (st.gates_with_misses_native > 0) == on
            assert eng.residency.state.scan[0] == 0  # only while a prompt is gated
            figures.append((tokens, st.hits, st.misses, st.evictions, st.bytes_read))
            budget = eng.budget
        traces.append(load(trace))
    assert figures[0] == figures[1]
    data = traces[0]
    assert any(data.prompt) and not all(data.prompt)
    live = replay(data, budget, "lfru")
    assert (live.hits, live.hits + live.misses) == (data.live_hits, data.live_accesses)
    data.prompt = [False] * len(data.events)
    assert replay(data, budget, "lfru").hits != live.hits


def test_the_c_gate_and_the_pager_stamp_uses_as_the_access_state_records_them(pack_of, tmp_path: Path) -> None:
    """Last use, use count and lfru's score after a run (hits stamped by the C gate, misses by
    the pager) equal those of the trace's gates recorded one by one in Python, a prompt's tokens
    counted each (without them the scores differ)."""
    trace = tmp_path / "t.jsonl"
    eng, _tokens, _logits, _seen = _run(pack_of("qwen3moe", "q4_k"), "25%", "Once upon", trace=str(trace))
    with eng:
        live = eng.residency.state
        assert eng.stats().gates_with_misses_native > 0 and eng.stats().hits > 0
    data = load(trace)
    ref, once = (AccessState.new(live.n_layer, live.n_expert) for _ in range(2))
    for _pos, _n, layer, rows in data.events:
        experts, picks = np.unique(rows, return_counts=True)
        ref.record(layer, experts.tolist(), ref.tick(), picks)
        once.record(layer, experts.tolist(), once.tick())
    assert ref.clock[0] == live.clock[0]
    assert np.array_equal(ref.last_use, live.last_use) and np.array_equal(ref.uses, live.uses)
    np.testing.assert_allclose(ref.freq, live.freq, rtol=1e-12)
    assert not np.allclose(once.freq, live.freq, rtol=1e-6)


def test_a_corrupt_part_read_by_the_native_pager_is_named(tiny_model, tmp_path: Path) -> None:
    pack = tmp_path / "p.pack"
    part = corrupted_pack(tiny_model("qwen3moe", "q4_k"), pack, layer=1, index=1)
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate=False) as eng:
        assert eng.residency.native is not None
        eng.residency.native.wait_opened()
        with pytest.raises(Exception, match=rf"layer 1 expert \d+ part {part}: checksum mismatch in "):
            eng.generate("Once upon", 4)  # too short for the read-ahead: the pager reads layer 1 first
        eng.residency.drain_native()
        st = eng.residency.stats
        assert st.native_fallbacks > 0  # the pager gave the gate back to Python, which named the part
        assert eng.residency.used == sum(eng.residency.leaf_cost(k[0]) for k in zip(*np.nonzero(eng.residency.state.resident)))


def test_the_flight_table_follows_the_fetcher() -> None:
    """Each state's byte, the I/O thread's start of a queued read, which fails once the native
    pager has taken the leaf, and a taken leaf forgotten without touching the table."""
    f = Flight()
    f.table = np.zeros((2, 4), np.uint8)
    f[(1, 2)] = QUEUED
    f[(0, 3)] = DOWN
    assert f.table[1, 2] == TABLE_QUEUED and f.table[0, 3] == TABLE_OTHER
    assert f.start((1, 2)) and f[(1, 2)] == LOADING and f.table[1, 2] == TABLE_LOADING
    assert not f.start((1, 2))  # not queued any more
    del f[(1, 2)]
    assert f.pop((0, 3)) == DOWN and f.pop((0, 3), None) is None
    assert not f.table.any() and not f
    f[(1, 1)] = QUEUED
    f.table[1, 1] = TABLE_TAKEN  # as the pager's compare-and-swap does
    assert not f.start((1, 1)) and f[(1, 1)] == QUEUED
    f.table[1, 1] = 0  # read by the gate
    f.forget((1, 1))
    assert not f and not f.table.any()


def test_the_shared_lock_excludes_and_flags_store() -> None:
    lock = native.NativeLock()
    with lock:
        pass
    t = np.zeros((3, 5), np.uint8)
    signal = native.FlightSignal()
    flag = t.ctypes.data + 2 * t.strides[0] + 4  # t[2, 4]
    signal.store(flag, 1)
    assert t[2, 4] == 1 and t.sum() == 1
    assert signal.start(flag) and t[2, 4] == 2 and not signal.start(flag)


def test_a_failed_prefetch_stays_off_limits_to_the_pager_until_reaped() -> None:
    """Its pages and charge are given back by the gate thread when it reaps the failure; until
    then the pager must not read the leaf into pages about to be released."""

    def fill(layer: int, e: int, stage: int | None) -> None:
        if (layer, e) == (0, 1):
            raise OSError("bad disk")

    landed: list[tuple[int, int]] = []
    f = Fetcher(fill, lambda key, _p: landed.append(key), workers=2)
    f.flight.table = np.zeros((1, 4), np.uint8)
    f.prefetch((0, 1))
    f.prefetch((0, 2))
    f.drain()
    assert landed == [(0, 2)] and f.flight.table.tolist() == [[0, TABLE_FAILED, 0, 0]]
    assert f.take_failures() == [(0, 1)] and not f.flight.table.any()
    f.close()


@pytest.mark.parametrize("checksums", ["first", "always", "never"])
def test_the_pager_checks_what_the_checksum_mode_asks(checksums: str, pack_of) -> None:
    eng, _tokens, _logits, _seen = _run(pack_of("qwen3moe", "q4_k"), "25%", "Once upon", checksums=checksums)
    with eng:
        st = eng.source.store.stats
        assert eng.stats().gates_with_misses_native > 0
        n_parts = sum(len(parts) for parts in eng.source.store.leaves.values())
        if checksums == "always":
            assert st.checked_parts == st.part_reads > n_parts  # every read, re-reads included
        elif checksums == "first":
            assert 0 < st.checked_parts <= n_parts < st.part_reads  # each part once at most
        else:
            assert st.checked_parts == 0


def test_a_pack_without_xxh64_is_paged_by_python(tiny_model, tmp_path: Path) -> None:
    """The pager checks XXH64 only: a pack split before it was recorded (sha256 only) is paged by
    the Python residency, which checks sha256, with one core left to its I/O threads."""
    pack = tmp_path / "p.pack"
    split(tiny_model("qwen3moe", "q4_k"), pack)
    path = pack / "manifest.json"
    path.write_text(re.sub(r',\s*"xxh64":\s*"[0-9a-f]+"', "", path.read_text()))
    assert '"xxh64"' not in path.read_text()
    eng, _tokens, _logits, _seen = _run(pack, "25%", "Once upon", n_threads=None)
    with eng:
        st = eng.stats()
        assert st.gates_with_misses_native == 0 and st.misses > 0 and eng.source.store.stats.checked_parts > 0
        assert eng.residency.native is not None and not eng.residency.native.enabled
        assert eng.n_threads == max(1, eng.n_threads_batch - 1)


def test_room_for_a_prefetch_is_made_in_c_and_spares_what_it_must(pack_of) -> None:
    """Never a leaf the gated node reads, one the same prefetch call queued before, a pinned or
    a predicted one; with nothing else to evict, nothing changes."""
    pack = pack_of("qwen3moe", "q4_k")
    with Engine(pack, budget=budgets(pack)["min"], n_ctx=256, n_threads=2, profile=None, speculate=False) as eng:
        r, nat = eng.residency, eng.residency.native
        assert nat is not None and nat.enabled
        r.on_experts(0, np.arange(4, dtype=np.int32))
        cost = r.leaf_cost(0)
        assert r.used == r.budget and r.state.resident[0, :4].all()
        assert not nat.make_room(cost, 0, [0, 1, 2, 3], [], None) and r.used == r.budget
        r.state.pinned[0, 0] = r.state.protect[0, 1] = 1
        assert nat.make_room(cost, 1, [], [(0, 2)], None)
        assert r.state.resident[0].tolist()[:4] == [1, 1, 1, 0] and r.used == r.budget - cost
        r.drain_native()
        assert r.stats.evictions == 1 and eng.xslot.mincore_bytes() <= r.used


def test_native_prefetches_held_in_the_queue_are_promoted_or_cancelled_by_the_gate(
        pack_of, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Speculation queues its prefetches on the reader pool (a decoded token's guessed in C, a
    prompt's in Python); none starts here (background reads are held, and so are the Python I/O
    threads, which would read the others). A gate that needs one moves its reads ahead and waits for it; a gate that
    needs the room a queued one holds cancels it (least likely first). The books balance (every
    queued prefetch was used, cancelled or is still queued, and charged once), the budget holds
    and the output is bit-exact."""
    monkeypatch.setattr(Fetcher, "_next_prefetch", lambda self: False)
    # the lowest bar at which every prefetch is likely enough for the native pager (HOLD_BELOW)
    monkeypatch.setattr(residency, "READ_COST", HOLD_BELOW)
    pack = pack_of("qwen3moe", "q4_k")
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate_native=True) as eng:
        r, nat, pool = eng.residency, eng.residency.native, eng.source.store._readers()
        assert nat is not None and eng.spec_native is not None
        nat.wait_opened()
        eng.observer_switch.keep(True)
        pool.hold(True)
        try:
            tokens: list[int] = []
            logits: list[np.ndarray] = []
            for step in eng.stream(PROMPT, N_TOKENS, keep_logits=True):
                tokens.append(step.token)
                logits.append(step.logits)
                assert eng.xslot.mincore_bytes() <= r.used <= eng.budget
            r.drain_native()
            st = eng.stats()
            counts = all_sources(st.prefetch_by_source)
            flying = [tuple(k) for k in np.argwhere(r.flight_table == TABLE_NATIVE)]
            assert not r.fetcher.flight and counts["claimed"] == 0  # a prompt's guesses (Python's) are queued in C too
            assert counts["queued"] == counts["used"] + counts["cancelled"] + len(flying)
            assert counts["late"] > 0 and counts["cancelled"] > 0
            assert st.prefetch_wasted == 0  # nothing landed that a gate did not ask for
            resident_cost = sum(r.leaf_cost(int(k[0])) for k in zip(*np.nonzero(r.state.resident)))
            assert r.used == resident_cost + sum(r.leaf_cost(k[0]) for k in flying)
        finally:
            pool.hold(False)
        assert same(reference(tiny_model("qwen3moe", "q4_k"), eng), tokens, logits)


def test_a_prefetch_call_sends_its_likely_leaves_to_the_native_pager_and_the_rest_to_the_io_threads(
        pack_of, monkeypatch: pytest.MonkeyPatch) -> None:
    """One call mixing likely and unlikely leaves: those at least HOLD_BELOW likely are queued by
    the native pager, the others by the Python I/O threads; each is charged once and counted for
    its asker."""
    monkeypatch.setattr(Fetcher, "_next_prefetch", lambda self: False)  # the I/O threads start nothing
    pack = pack_of("qwen3moe", "q4_k")
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate=False) as eng:
        r, nat, pool = eng.residency, eng.residency.native, eng.source.store._readers()
        assert nat is not None
        nat.wait_opened()
        pool.hold(True)  # the native pager's background reads stay queued
        try:
            keys = [(1, 0), (1, 1), (1, 2), (1, 3)]
            prios = [0.9, HOLD_BELOW / 2, 0.7, HOLD_BELOW / 4]
            assert r.prefetch(keys, layer=0, in_use=[], priority=prios, source="speculation") == 4
            assert r.flight_table[1, 0] == TABLE_NATIVE and r.flight_table[1, 2] == TABLE_NATIVE
            assert (1, 1) in r.fetcher and (1, 3) in r.fetcher
            assert (1, 0) not in r.fetcher and r.flight_table[1, 1] != TABLE_NATIVE
            assert r.used == 4 * r.leaf_cost(1)
            assert eng.stats().prefetch_by_source["speculation"]["queued"] == 4
        finally:
            pool.hold(False)
        nat.wait_all()
        r.drain_native()
        assert r.state.resident[1, 0] and r.state.resident[1, 2]


def test_a_failed_native_prefetch_is_reaped_and_its_part_named_by_the_gate(tiny_model, tmp_path: Path) -> None:
    pack = tmp_path / "p.pack"
    part = corrupted_pack(tiny_model("qwen3moe", "q4_k"), pack, layer=1, index=0, expert=3)
    with Engine(pack, budget="25%", n_ctx=256, n_threads=2, profile=None, speculate=False) as eng:
        r, nat = eng.residency, eng.residency.native
        assert nat is not None
        nat.wait_opened()
        assert nat.prefetch([(1, 2), (1, 3)], [0.9, 0.8], layer=0, in_use=[]) == 2
        assert r.used == 2 * r.leaf_cost(1)
        nat.wait_all()
        r.drain_native()  # (1, 3) failed: reaped
        assert r.state.resident[1, 2] and not r.state.resident[1, 3] and r.flight_table[1, 3] == 0
        assert r.used == r.leaf_cost(1) and r.stats.prefetched == 1
        with pytest.raises(Exception, match=rf"layer 1 expert 3 part {part}: checksum mismatch in "):
            r.on_experts(1, np.array([2, 3], np.int32))
        assert r.used == r.leaf_cost(1) and r.state.resident[1, 2]


def test_a_prompt_served_one_stage_at_a_time_is_chosen_alike_in_c_python_and_replay(pack_of, tmp_path: Path) -> None:
    """Where a micro-batch's leaves do not fit whole they are read one stage at a time and let go
    after their layer; the native pager leaves the next gate to Python meanwhile, so C and Python
    choose alike, and the trace (with its stage costs) replays the live run's hits exactly."""
    figures, traces = [], []
    for on in (True, False):
        trace = tmp_path / f"t{on}.jsonl"
        with Engine(pack_of("qwen3moe", "q4_k"), budget="15%", n_ctx=256, n_threads=2, profile=None,
                    speculate=False, native=on, trace=str(trace), policy="lfru") as eng:
            assert eng.residency.split_prompts
            if eng.residency.native is not None:
                eng.residency.native.wait_opened()
            tokens = eng.generate(PROMPT, 8).tokens
            st = eng.stats()
            assert eng.residency.stats.split_loads > 0
            assert (st.gates_with_misses_native > 0) == on
            figures.append((tokens, st.hits, st.misses, st.evictions, st.bytes_read))
            budget = eng.budget
        traces.append(load(trace))
    assert figures[0] == figures[1]
    data = traces[0]
    assert data.stage_cost is not None
    live = replay(data, budget, "lfru")
    assert (live.hits, live.hits + live.misses) == (data.live_hits, data.live_accesses)
    data.header.pop("stage_cost")  # whole leaves only: other micro-batches, other hits
    assert replay(data, budget, "lfru").hits != live.hits
