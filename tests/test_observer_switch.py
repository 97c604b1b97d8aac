"""ObserverSwitch: the gate's observers pause only where decode is measurably faster without them."""

from __future__ import annotations

from smoe_gguf.gate import ObserverSwitch


def feed(sw: ObserverSwitch, n: int, seconds: float, stall: float = 0.0) -> list[bool]:
    return [sw.tick(seconds, stall) for _ in range(n)]


def measure(sw: ObserverSwitch, on: float | list[float], off: float | list[float], stall_off: float = 0.0,
            rounds: int = 1) -> list[bool]:
    """``rounds`` rounds of ``2 * window`` tokens: each token takes ``on`` or ``off`` seconds by
    the state it ran in (a list: the next value in turn, cycled; a token without observers
    stalls ``stall_off``). Returns the states the tokens ran in."""
    times = {True: on if isinstance(on, list) else [on], False: off if isinstance(off, list) else [off]}
    used = {True: 0, False: 0}
    states = []
    for _ in range(2 * sw.window * rounds):
        state = sw.observing
        states.append(state)
        t = times[state][used[state] % len(times[state])]
        used[state] += 1
        sw.tick(t, 0.0 if state else stall_off)
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


def test_observers_paused_when_they_are_slower() -> None:
    sw = ObserverSwitch(window=4, hold=10)
    measure(sw, 0.020, 0.010, stall_off=0.004)
    assert sw.phase == "hold" and not sw.observing and sw.pauses == 1
    assert feed(sw, 2, 0.010) == [False] * 2
    assert feed(sw, 1, 0.5, stall=0.4) == [False]  # one stalling token: not yet a change of topic
    assert feed(sw, 2, 0.010) == [False] * 2
    # tokens that stall, on average, longer than a fast token takes: a change of topic, measure again
    assert feed(sw, 1, 0.5, stall=0.4) == [True]  # 2 of the last 4: half
    assert sw.phase == "measure"


# token times that vary with the misses each token meets: 10-30 ms, mean 20 ms, sd about 8 ms
NOISY = [0.010, 0.030, 0.014, 0.026, 0.018, 0.022, 0.012, 0.028]


def test_a_difference_within_the_noise_keeps_the_observers_and_measures_longer() -> None:
    """Observers 2 ms slower per token where tokens vary by 8 ms: after 2 x window tokens the
    difference is within 1.5 standard errors, so the switch measures on, to 4 x window tokens,
    and keeps the observers (a plain comparison of means would have paused them)."""
    sw = ObserverSwitch(window=4, hold=10)
    measure(sw, [t + 0.002 for t in NOISY], NOISY)
    assert sw.phase == "measure" and sw.pauses == 0
    measure(sw, [t + 0.002 for t in NOISY], NOISY)
    assert sw.phase == "hold" and sw.observing and sw.pauses == 0


def test_a_difference_beyond_the_noise_pauses_the_observers() -> None:
    """The same noise, observers 15 ms slower per token: paused at the first look."""
    sw = ObserverSwitch(window=4, hold=10)
    measure(sw, [t + 0.015 for t in NOISY], NOISY)
    assert sw.phase == "hold" and not sw.observing and sw.pauses == 1


def test_negative_control_a_wider_margin_keeps_them() -> None:
    """With a margin of 10 standard errors, 15 ms slower is within it: kept after 4 x window."""
    sw = ObserverSwitch(window=4, hold=10, slower_by=10.0)
    measure(sw, [t + 0.015 for t in NOISY], NOISY, rounds=2)
    assert sw.phase == "hold" and sw.observing and sw.pauses == 0


def test_a_trend_weighs_on_both_states_alike() -> None:
    """Tokens that get faster as the cache warms, whatever the state: measured in turns (on,
    off, off, on), the drift cancels. Observers 0.5 ms slower per token (measured in two
    halves, the first, observers on, would have lost by 8 ms) are within the noise of the drift:
    kept; 10 ms slower is beyond it: paused."""
    for slower, kept in ((0.0005, True), (0.010, False)):
        sw = ObserverSwitch(window=8, hold=128, block=2)
        t = [0.030 - 0.001 * i for i in range(32)]
        for i in range(32):
            if sw.phase != "measure":
                break
            sw.tick(t[i] + (slower if sw.observing else 0.0), 0.0)
        assert sw.phase == "hold" and sw.observing == kept and sw.pauses == (not kept)


def test_kept_observers_are_never_measured() -> None:
    sw = ObserverSwitch(window=2, hold=4)
    sw.keep(True)
    assert feed(sw, 20, 1.0, stall=1.0) == [True] * 20 and sw.phase == "fixed"


def test_negative_control_no_decision_before_a_round() -> None:
    sw = ObserverSwitch(window=8, hold=128)
    feed(sw, 15, 1.0, stall=1.0)  # stalls alone do not end a measuring round
    assert sw.phase == "measure" and sw.pauses == 0
