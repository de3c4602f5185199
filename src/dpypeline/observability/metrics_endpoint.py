"""The HTTP endpoint Prometheus scrapes: ``GET`` (or ``HEAD``) ``/metrics``, nothing else.

prometheus-client's own server (``http.server``) gives every connection a thread of its own
and no timeout, so idle clients pile up threads until the service meets its task limit
(systemd's ``TasksMax=``) and cannot start the threads its jobs need. Here one thread runs
an asyncio loop that holds every connection, however many and however slow: each has
REQUEST_TIMEOUT to send its request head and WRITE_TIMEOUT to take the answer, one request
a connection; at most MAX_CONNECTIONS are open, a new one dropping the oldest that has not
sent its request yet. The answer is prometheus-client's own (its WSGI app: text or
OpenMetrics as the scraper asks, gzip, ``name[]``), made on one thread of its own so that
a slow ledger read never stalls the loop.

Whatever goes wrong here is logged as our events, and none of it reaches the service or its
jobs. Clients' troubles (one dropped, timed out, reset, or sending what is not HTTP) are
each a debug line naming the client, and counted in one ``metrics_clients_dropped`` warning
at most every REPORT_EVERY seconds: a flood of idle connections does not flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from dpypeline.observability.logs import get_logger

log = get_logger("dpypeline.metrics")

PATH = "/metrics"
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its whole request head
WRITE_TIMEOUT = 10.0  # seconds for a client to take the whole answer
MAX_CONNECTIONS = 64  # open at once; Prometheus needs one per scraping server
BACKLOG = 1024  # connections the kernel holds until the loop takes them (somaxconn caps it)
MAX_HEAD = 16 * 1024  # bytes of a request head (request line and headers)
ALLOW = "GET, HEAD"
REPORT_EVERY = 60.0  # seconds between two warnings counting clients' troubles

Answer = tuple[HTTPStatus, list[tuple[str, str]], bytes]


class MetricsEndpoint:
    """A listening socket, the loop thread that serves it, and the thread that collects."""

    def __init__(
        self,
        registry: Collector,
        host: str,
        port: int,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """Bind and listen at once (an address in use raises OSError here, in the caller's
        thread); serving starts with :meth:`start`."""
        self.request_timeout, self.write_timeout = request_timeout, write_timeout
        self.max_connections = max_connections
        self._app = make_wsgi_app(registry)
        self._sock = socket.create_server((host, port), backlog=BACKLOG)
        self._sock.setblocking(False)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._collect = ThreadPoolExecutor(1, thread_name_prefix="metrics-collect")
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # for their request, oldest first
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._troubles: Counter[str] = Counter()  # since the last report, by kind
        self._last_report = float("-inf")
        self._report: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name="metrics-endpoint", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve on a thread of its own; RuntimeError if no thread can be had."""
        self._thread.start()

    def close(self) -> None:
        """Idempotent: stop serving, drop every connection, end both threads."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()
        self._sock.close()
        self._collect.shutdown(wait=True, cancel_futures=True)

    # -- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(_loop_error)
        try:
            self._loop.run_until_complete(self._serve())
        except Exception as exc:  # noqa: BLE001 - never the service's end: it runs on without
            log.error(
                "metrics_endpoint_failed",
                error=f"{type(exc).__name__}: {exc}",
                action="the service runs on without /metrics; restart it to have them again",
            )
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(
            self._connection, sock=self._sock, limit=MAX_HEAD, backlog=BACKLOG
        )
        try:
            await self._stop.wait()
        finally:
            server.close()
            for writer in list(self._open):
                writer.transport.abort()  # each handler sees its connection gone and ends
            if self._tasks:
                _, stuck = await asyncio.wait(self._tasks, timeout=self.write_timeout)
                for task in stuck:  # waiting on a collection that does not end
                    task.cancel()
            await server.wait_closed()  # from Python 3.12, until every connection is gone
            if self._report is not None:
                self._report.cancel()
                self._report_troubles()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._open.add(writer)
        self._waiting[writer] = None
        client = _peer(writer)
        try:
            if len(self._open) > self.max_connections:
                self._drop_oldest()
            await self._exchange(reader, writer, client)
        except Exception as exc:  # noqa: BLE001 - one client's trouble, never the service's
            log.error(
                "metrics_request_failed",
                client=client,
                error=_reason(exc),
                action="the endpoint serves on; if this recurs, report it with this line",
            )
        finally:
            self._waiting.pop(writer, None)
            self._open.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    def _drop_oldest(self) -> None:
        oldest = next(iter(self._waiting))
        del self._waiting[oldest]
        self._trouble("over_limit", _peer(oldest), f"{self.max_connections} connections open")
        oldest.transport.abort()

    def _trouble(self, kind: str, client: str, detail: str) -> None:
        """A client's trouble: a debug line now, counted in the next report."""
        log.debug("metrics_client_dropped", client=client, kind=kind, detail=detail)
        self._troubles[kind] += 1
        if self._report is None:
            wait = max(self._last_report + REPORT_EVERY - self._loop.time(), 0.0)
            self._report = self._loop.call_later(wait, self._report_troubles)

    def _report_troubles(self) -> None:
        self._report, self._last_report = None, self._loop.time()
        log.warning(
            "metrics_clients_dropped",
            **dict(sorted(self._troubles.items())),
            limits=f"{self.max_connections} connections, {self.request_timeout:g}s to send"
            f" a request, {self.write_timeout:g}s to take the answer",
            action="nothing, if these are not Prometheus; if they are, see its scrape errors",
        )
        self._troubles.clear()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str
    ) -> None:
        try:
            async with asyncio.timeout(self.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self._trouble("request_timeout", client, "no whole request in time")
            return
        except asyncio.IncompleteReadError:  # closed (or dropped) before a whole request
            return
        except asyncio.LimitOverrunError:
            head = b""  # a 400: the head is over MAX_HEAD
        except ConnectionError as exc:
            self._trouble("reset", client, _reason(exc))
            return
        finally:
            self._waiting.pop(writer, None)
        method, status, headers, body = await self._answer(head, client)
        writer.transport.set_write_buffer_limits(0)  # drain: until all is with the kernel
        head_lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
        head_lines += [f"{name}: {value}" for name, value in headers]
        head_lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(head_lines).encode("latin-1"))
        if method != "HEAD":
            writer.write(body)
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.drain()
        except TimeoutError:
            self._trouble("write_timeout", client, "the answer was not taken in time")
        except ConnectionError as exc:
            self._trouble("reset", client, _reason(exc))

    async def _answer(self, head: bytes, client: str) -> tuple[str, HTTPStatus, list[Any], bytes]:
        """(method, status, headers, body) for a request head."""
        line, _, rest = head.partition(b"\r\n")
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._trouble("bad_request", client, repr(line[:200]))
            return "", *_plain(HTTPStatus.BAD_REQUEST, "not an HTTP/1.x request head")
        method, target, _ = parts
        url = urlsplit(target)
        if url.path != PATH:
            return method, *_plain(HTTPStatus.NOT_FOUND, f"only {PATH} is served here")
        if method not in ("GET", "HEAD"):
            status, headers, body = _plain(HTTPStatus.METHOD_NOT_ALLOWED, f"use {ALLOW}")
            return method, status, [*headers, ("Allow", ALLOW)], body
        try:
            fields = http.client.parse_headers(io.BytesIO(rest))
        except http.client.HTTPException as exc:  # a header line too long, too many of them
            self._trouble("bad_request", client, _reason(exc))
            return method, *_plain(HTTPStatus.BAD_REQUEST, "bad request headers")
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": url.path,
            "QUERY_STRING": url.query,
            "HTTP_ACCEPT": fields.get("Accept", ""),
            "HTTP_ACCEPT_ENCODING": fields.get("Accept-Encoding", ""),
        }
        try:
            loop = asyncio.get_running_loop()
            return method, *await loop.run_in_executor(self._collect, self._call_app, environ)
        except Exception as exc:  # noqa: BLE001 - a failed collection is a 500, not the end
            log.error(
                "metrics_collect_failed",
                error=f"{type(exc).__name__}: {exc}",
                action="the next scrape tries again; if this goes on, see the service's log",
            )
            return method, *_plain(HTTPStatus.INTERNAL_SERVER_ERROR, "the metrics failed")

    def _call_app(self, environ: dict[str, str]) -> Answer:
        """prometheus-client's WSGI app, called on the collecting thread."""
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            started[:] = [HTTPStatus(int(status.split(maxsplit=1)[0])), headers]

        body: Iterable[bytes] = self._app(environ, start_response)
        return started[0], [h for h in started[1] if h[0]], b"".join(body)


def _plain(status: HTTPStatus, text: str) -> Answer:
    return status, [("Content-Type", "text/plain; charset=utf-8")], f"{text}\n".encode()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return f"{type(exc).__name__}: {text}"


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own reports (an accept that failed for want of file descriptors, say),
    as our events rather than lines of its own."""
    exc = context.get("exception")
    if isinstance(exc, asyncio.CancelledError):  # a handler stopped at close: nothing wrong
        return
    log.warning(
        "metrics_endpoint_error",
        error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
        message=context.get("message"),
    )
