"""ObserverSwitch: the gate's observers run only while decode is faster with them."""

from __future__ import annotations

from smoe_gguf.gate import ObserverSwitch


def feed(sw: ObserverSwitch, n: int, seconds: float, stall: float = 0.0) -> list[bool]:
    return [sw.tick(seconds, stall) for _ in range(n)]


def test_observers_kept_when_they_are_faster() -> None:
    sw = ObserverSwitch(window=4, hold=10)
    assert feed(sw, 3, 0.010) == [True] * 3
    assert sw.tick(0.010, 0.0) is False  # 4 tokens measured with: now 4 without
    assert feed(sw, 3, 0.020) == [False] * 3
    assert sw.tick(0.020, 0.0) is True  # without was slower: observers back on and held
    assert sw.phase == "hold" and sw.pauses == 0
    assert feed(sw, 9, 0.010) == [True] * 9
    sw.tick(0.010, 0.0)  # hold over: measure again
    assert sw.phase == "on"


def test_observers_paused_when_they_cost_more_than_they_hide() -> None:
    sw = ObserverSwitch(window=4, hold=10)
    feed(sw, 4, 0.020)  # with observers: slower
    out = feed(sw, 4, 0.010)
    assert out[-1] is False and sw.phase == "hold" and sw.pauses == 1
    assert feed(sw, 2, 0.010) == [False] * 2
    assert feed(sw, 1, 0.5, stall=0.4) == [False]  # one stalling token: not yet a change of topic
    assert feed(sw, 2, 0.010) == [False] * 2
    # tokens that stall, on average, longer than a fast token takes: a change of topic, measure again
    assert feed(sw, 1, 0.5, stall=0.4) == [True]  # 2 of the last 4: half
    assert sw.phase == "on"


def test_negative_control_no_decision_before_a_window() -> None:
    sw = ObserverSwitch(window=8, hold=128)
    assert feed(sw, 7, 1.0, stall=1.0) == [True] * 7  # stalls alone do not switch while measuring
    assert sw.phase == "on"
