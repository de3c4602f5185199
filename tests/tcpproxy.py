"""A TCP proxy on loopback that plays an object store in trouble, for the outage tests.

It forwards 127.0.0.1:PORT to an upstream address (the moto server) in one of three modes,
switchable at any time:

- ``pass``: bytes flow both ways, as if the proxy were not there;
- ``refuse``: nothing listens on the port any more (a connect is refused) and every open
  connection is reset: a store that is down;
- ``blackhole``: connections are accepted and requests read, but nothing ever comes back,
  on new and open connections alike: a store that hangs (a stuck load balancer, a dead
  backend behind a live frontend).

A connection that ever dropped bytes stays silent, so a half-forwarded request can never
reach the store after the proxy goes back to ``pass``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

MODES = ("pass", "refuse", "blackhole")


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self._guard = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._listen()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        with self._guard:
            self.mode = mode
        if mode == "refuse":
            self._unlisten()
            self._reset_all()
        elif self._listener is None:
            self._listen()

    def close(self) -> None:
        self._stopped.set()
        self._unlisten()
        self._reset_all()

    # -- internals ------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy-accept").start()

    def _unlisten(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while listener.fileno() != -1 and not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream: socket.socket | None = None
            if self.mode == "pass":
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()
                    continue
            with self._guard:
                self._conns += [s for s in (client, upstream) if s is not None]
            silent = threading.Event()
            if upstream is None:
                silent.set()
            self._pump(client, upstream, silent)
            if upstream is not None:
                self._pump(upstream, client, silent)

    def _pump(self, src: socket.socket, dst: socket.socket | None, silent: threading.Event) -> None:
        def run() -> None:
            try:
                while data := src.recv(65536):
                    if self.mode != "pass":
                        silent.set()
                    if dst is not None and not silent.is_set():
                        dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    if s is not None and not silent.is_set():
                        _shut(s)

        threading.Thread(target=run, name="proxy-pump", daemon=True).start()

    def _reset_all(self) -> None:
        with self._guard:
            conns, self._conns = self._conns, []
        for s in conns:
            # SO_LINGER 0: close sends a RST, as a crashed or rebooted store does
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _shut(s)
            s.close()


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def s3_proxy(s3: object) -> Iterator[TcpProxy]:
    """The test's moto server behind a :class:`TcpProxy` (starts in ``pass`` mode)."""
    port = int(s3.port)  # type: ignore[attr-defined]
    proxy = TcpProxy(("127.0.0.1", port))
    yield proxy
    proxy.close()
