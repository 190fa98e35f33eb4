"""Ports for devstacks and tests: free, and outside the range outgoing connections draw from."""

from __future__ import annotations

import itertools
import socket
from collections import deque

import pytest

from shoal_common.natsserver import _ephemeral_low, free_port, port_is_free, worker_port_range


def test_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    for _ in range(20):
        port = free_port()
        assert 1024 < port < _ephemeral_low()
        assert port_is_free(port)


def test_a_listening_port_is_not_free() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        assert not port_is_free(listener.getsockname()[1])


def test_a_port_is_not_given_twice_before_it_is_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two picks before either listener binds (nats-server's client and monitor ports): the
    # second must not be the first again, free as it still is.
    picks = iter([24001, 24001, 24002])
    monkeypatch.setattr("shoal_common.natsserver.random.randint", lambda _a, _b: next(picks))
    monkeypatch.setattr("shoal_common.natsserver._GIVEN", deque(maxlen=8))
    monkeypatch.setattr("shoal_common.natsserver.port_is_free", lambda _port: True)
    assert [free_port(), free_port()] == [24001, 24002]


def test_ports_come_from_the_range_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_PORT_RANGE", "21000-21009")
    monkeypatch.setattr("shoal_common.natsserver._GIVEN", deque(maxlen=8))
    ports = {free_port() for _ in range(5)}
    assert ports <= set(range(21000, 21010))
    assert len(ports) == 5


def test_a_malformed_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_PORT_RANGE", "21000")
    with pytest.raises(ValueError, match="LOW-HIGH"):
        free_port()


def test_workers_get_disjoint_slices_of_the_range() -> None:
    slices = [worker_port_range(i, 3) for i in range(3)]
    assert slices[0][0] == 20000
    assert slices[2][1] < _ephemeral_low()
    for (_, high), (low, _) in itertools.pairwise(slices):
        assert high < low
