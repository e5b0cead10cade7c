"""Refusal pacing: past `CXR_REFUSALS_PER_S`, a refusal waits its turn, at most
`CXR_REFUSAL_MAX_HOLD_S`, with its body still unread; below that rate refusals are answered at
once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.http.admission_gate import RefusalPacer
from tests.app.http.test_admission_gate import RawExchange, drive, one_image_held
from tests.support.testkit import encode, xray_like


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_second_of_refusals_at_once_then_each_waits_its_turn_up_to_the_cap() -> None:
    clock = Clock()
    pacer = RefusalPacer(rate_per_s=10.0, max_hold_s=0.5, clock=clock)
    # A second's worth (10) plus the one due now are answered at once.
    assert [pacer.hold_s() for _ in range(11)] == [0.0] * 11
    # Then each one 0.1 s after the last, until the wait would pass the cap.
    waits = [pacer.hold_s() for _ in range(5)]
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    # Past the cap: held for the cap, without taking a turn (the next turn is unchanged).
    assert pacer.hold_s() == 0.5 and pacer.hold_s() == 0.5
    clock.now += 0.3
    assert pacer.hold_s() == pytest.approx(0.3)
    # A quiet spell gives the burst back.
    clock.now += 10.0
    assert [pacer.hold_s() for _ in range(11)] == [0.0] * 11


def test_rate_zero_never_holds() -> None:
    pacer = RefusalPacer(rate_per_s=0.0, max_hold_s=2.0, clock=Clock())
    assert {pacer.hold_s() for _ in range(1000)} == {0.0}


def test_past_the_rate_a_refusal_is_held_with_its_body_unread(model_path: Path) -> None:
    image = encode(xray_like(), "PNG")
    pacing = {"refusals_per_s": 1.0, "refusal_max_hold_s": 0.6}
    with one_image_held(model_path, **pacing) as (app, client, _):
        assert client.portal is not None
        timings = []
        for _ in range(4):
            started = time.perf_counter()
            refused = client.portal.call(drive, app, RawExchange([image]), len(image))
            timings.append(time.perf_counter() - started)
            assert refused.status == 429
            assert refused.headers["connection"] == "close"
            assert refused.received_calls == 0 and refused.body_bytes_read == 0
    # Rate 1/s with a second's burst: two at once; the third's turn (2 s on) is past the cap, so
    # it is held for the cap; by then the fourth's turn is 0.4 s away, and it waits for it.
    assert timings[0] < 0.3 and timings[1] < 0.3, timings
    assert 0.55 <= timings[2] < 1.5, timings
    assert 0.3 <= timings[3] < 0.6, timings
