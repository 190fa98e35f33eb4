"""A connection the server drops is tried once more; a second drop, or a timeout, is an error."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from shoal_client.client import ShoalClient, ShoalClientError

_ANSWER = b'{"state": "ok"}'
_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(_ANSWER)}\r\nConnection: close\r\n\r\n".encode()
    + _ANSWER
)


class FlakyServer:
    """Resets (RST, as a closed keep-alive socket does) the first ``drops`` connections, then
    answers every request with 200."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)
                if self.connections <= self.drops:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    conn.sendall(_OK)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[FlakyServer]:
    flaky = FlakyServer(drops=request.param)
    yield flaky
    flaky.close()


@pytest.mark.parametrize("server", [1], indirect=True)
def test_one_dropped_connection_is_tried_again(server: FlakyServer) -> None:
    with ShoalClient(server.url, sign_requests=False, token="") as client:
        assert client._get("/anything") == {"state": "ok"}
    assert server.connections == 2


@pytest.mark.parametrize("server", [2], indirect=True)
def test_two_dropped_connections_are_an_error_without_a_traceback(server: FlakyServer) -> None:
    client = ShoalClient(server.url, sign_requests=False, token="")
    with client, pytest.raises(ShoalClientError) as refused:
        client._get("/anything")
    assert refused.value.status == 0
    assert "cannot reach the requester" in str(refused.value)
    assert server.connections == 2


def test_a_timeout_is_not_tried_again() -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = ShoalClient(url, timeout=0.3, sign_requests=False, token="")
        with client, pytest.raises(ShoalClientError, match="cannot reach the requester"):
            client._get("/anything")
        assert len(held) == 1
    finally:
        silent.close()
        for conn in held:
            conn.close()
