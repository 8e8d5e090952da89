"""The service's lease counting: a replaced object is closed once, when its last request ends."""

from __future__ import annotations

import threading

from finegrain.service.lease import Leases


class Thing:
    def __init__(self, name: str):
        self.name = name
        self.closed = 0


def close(t: Thing) -> None:
    t.closed += 1


def test_swap_closes_the_old_object_when_its_last_lease_ends():
    a, b = Thing("a"), Thing("b")
    leases = Leases(a, close)
    with leases.lease() as held:
        assert held is a
        leases.swap(b)
        assert leases.current is b
        assert a.closed == 0  # still leased: not closed under the request
        with leases.lease() as newer:
            assert newer is b
    assert a.closed == 1 and b.closed == 0


def test_swap_without_leases_closes_at_once_and_each_object_once():
    a, b, c = Thing("a"), Thing("b"), Thing("c")
    leases = Leases(a, close)
    leases.swap(b)
    assert a.closed == 1
    leases.swap(c, close=lambda t: None)  # c is not the holder's to close
    assert b.closed == 1
    leases.retire()
    assert c.closed == 0
    leases.retire()
    assert a.closed == 1 and b.closed == 1


def test_retired_object_leased_again_is_still_closed_only_once():
    a = Thing("a")
    leases = Leases(a, close)
    leases.retire()
    assert a.closed == 1
    with leases.lease():
        pass
    assert a.closed == 1


def test_concurrent_leases_and_swaps_close_every_replaced_object_exactly_once():
    things = [Thing(str(i)) for i in range(200)]
    leases = Leases(things[0], close)
    stop = threading.Event()
    seen_closed: list[Thing] = []

    def request() -> None:
        while not stop.is_set():
            with leases.lease() as t:
                if t.closed:
                    seen_closed.append(t)

    workers = [threading.Thread(target=request) for _ in range(4)]
    for w in workers:
        w.start()
    for t in things[1:]:
        leases.swap(t)
    stop.set()
    for w in workers:
        w.join()
    assert not seen_closed  # no request ever held a closed object
    assert all(t.closed == 1 for t in things[:-1]) and things[-1].closed == 0
