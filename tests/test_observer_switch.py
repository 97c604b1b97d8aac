"""ObserverSwitch: the gate's observers run only while decode is faster with them."""

from __future__ import annotations

from smoe_gguf.gate import ObserverSwitch


def feed(sw: ObserverSwitch, n: int, seconds: float, stall: float = 0.0) -> list[bool]:
    return [sw.tick(seconds, stall) for _ in range(n)]


def measure(sw: ObserverSwitch, on: float, off: float, stall_off: float = 0.0, cost_on: float = 0.0) -> list[bool]:
    """One measuring round: each token takes ``on`` or ``off`` seconds by the state it ran in
    (a token without observers stalls ``stall_off``; the observers of one with them take
    ``cost_on``). Returns the states the tokens ran in."""
    states = []
    for _ in range(2 * sw.window):
        states.append(sw.observing)
        if sw.observing:
            sw.tick(on, 0.0, cost_on)
        else:
            sw.tick(off, stall_off)
    return states


def test_measuring_takes_turns_with_and_without_observers() -> None:
    sw = ObserverSwitch(window=4, hold=10, block=2)
    assert measure(sw, 0.010, 0.020) == [True, True, False, False, False, False, True, True]


def test_observers_kept_when_they_are_faster() -> None:
    sw = ObserverSwitch(window=4, hold=10)
    measure(sw, 0.010, 0.020)
    assert sw.phase == "hold" and sw.observing and sw.pauses == 0
    assert feed(sw, 9, 0.010) == [True] * 9
    sw.tick(0.010, 0.0)  # hold over: measure again
    assert sw.phase == "measure" and sw.observing


def test_observers_paused_when_they_cost_more_than_they_hide() -> None:
    sw = ObserverSwitch(window=4, hold=10)
    measure(sw, 0.020, 0.010, stall_off=0.004, cost_on=0.008)
    assert sw.phase == "hold" and not sw.observing and sw.pauses == 1
    assert feed(sw, 2, 0.010) == [False] * 2
    assert feed(sw, 1, 0.5, stall=0.4) == [False]  # one stalling token: not yet a change of topic
    assert feed(sw, 2, 0.010) == [False] * 2
    # tokens that stall, on average, longer than a fast token takes: a change of topic, measure again
    assert feed(sw, 1, 0.5, stall=0.4) == [True]  # 2 of the last 4: half
    assert sw.phase == "measure"


def test_observers_kept_where_they_cost_less_than_their_share_of_the_stall() -> None:
    """Tokens with observers measured slower (their prefetches also serve the turns without
    them), but the observers take 4 ms where a token without them waits 20 ms on reads, under
    a quarter of it: kept with a stall share of a quarter, paused by default (the faster state
    alone). With 12 ms of their own: paused."""
    sw = ObserverSwitch(window=4, hold=10)
    measure(sw, 0.032, 0.030, stall_off=0.020, cost_on=0.004)
    assert sw.phase == "hold" and not sw.observing and sw.pauses == 1
    sw = ObserverSwitch(window=4, hold=10, stall_share=0.25)
    measure(sw, 0.032, 0.030, stall_off=0.020, cost_on=0.004)
    assert sw.phase == "hold" and sw.observing and sw.pauses == 0
    sw = ObserverSwitch(window=4, hold=10, stall_share=0.25)
    measure(sw, 0.032, 0.030, stall_off=0.020, cost_on=0.012)
    assert sw.phase == "hold" and not sw.observing and sw.pauses == 1


def test_a_trend_weighs_on_both_states_alike() -> None:
    """Tokens that get faster as the cache warms, whatever the state: measured in turns (on,
    off, off, on), the drift cancels and the faster state wins (measured in two halves, the
    first, observers on, would have lost by 8 ms against their 0.5 ms gain)."""
    sw = ObserverSwitch(window=8, hold=128, block=2)
    t = [0.030 - 0.001 * i for i in range(16)]
    for i in range(16):
        sw.tick(t[i] - (0.0005 if sw.observing else 0.0), 0.0)  # observers 0.5 ms faster per token
    assert sw.phase == "hold" and sw.observing and sw.pauses == 0


def test_kept_observers_are_never_measured() -> None:
    sw = ObserverSwitch(window=2, hold=4)
    sw.keep(True)
    assert feed(sw, 20, 1.0, stall=1.0) == [True] * 20 and sw.phase == "fixed"


def test_negative_control_no_decision_before_a_round() -> None:
    sw = ObserverSwitch(window=8, hold=128)
    feed(sw, 15, 1.0, stall=1.0)  # stalls alone do not end a measuring round
    assert sw.phase == "measure" and sw.pauses == 0
