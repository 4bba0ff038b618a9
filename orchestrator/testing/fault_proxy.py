"""A fault-injecting HTTP proxy on loopback, in front of an S3 endpoint (the moto server), for
tests of what transient storage faults do to a run.

Every request is either forwarded unchanged or, for a configurable share of them, answered
with one of the faults S3 clients must survive:

- ``drop``: the connection is closed without an answer (a reset load balancer, a dead peer);
- ``slow_down``: HTTP 503 with S3's ``SlowDown`` error body (request-rate throttling).

Faults are injected before a request reaches the server, so an injected request has no effect
there and a retry is always safe to repeat. Requests are framed (``Content-Length`` or chunked
bodies), so faults hit requests on reused keep-alive connections too, not only new connections.
Decisions come from a seeded generator; their order still depends on thread timing.

    proxy = start_fault_proxy("http://127.0.0.1:5000", fault_rate=0.2)
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    ...
    proxy.stop(); print(proxy.counts)
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal
from urllib.parse import urlsplit

Fault = Literal["drop", "slow_down"]

SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")
SLOW_DOWN_HEAD = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(SLOW_DOWN_BODY))
MAX_HEAD = 64 * 1024


class _Closed(Exception):
    """The client closed its connection (between requests, or in the middle of one)."""


class _Reader:
    """Buffered reads from a socket, by line or by count, for framing HTTP requests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        self.buf += data

    def until(self, delimiter: bytes) -> bytes:
        while delimiter not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("HTTP head too long")
            self._fill()
        end = self.buf.index(delimiter) + len(delimiter)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float, faults: Sequence[Fault] = ("drop", "slow_down"),
                 seed: int = 0) -> None:
        if not 0 <= fault_rate < 1:
            raise ValueError(f"fault_rate must be in [0, 1), not {fault_rate}")
        target = urlsplit(upstream)
        if target.hostname not in ("127.0.0.1", "localhost") or target.port is None:
            raise ValueError(f"upstream must be a loopback http://host:port, not {upstream}")
        self.upstream = (target.hostname, target.port)
        self.fault_rate, self.faults = fault_rate, tuple(faults)
        self.counts: Counter[str] = Counter()  # "forwarded" and each fault: what was done, per request
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # so the accept loop sees stop() soon
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting connections; open ones end when their clients close them."""
        self._stopped.set()
        self._listener.close()
        self._thread.join(timeout=5)

    def _decide(self) -> str:
        with self._lock:
            kind = self._rng.choice(self.faults) if self._rng.random() < self.fault_rate else "forwarded"
            self.counts[kind] += 1
            return kind

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # the listener was closed by stop()
                return
            client.settimeout(None)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        reader = _Reader(client)
        try:
            while True:
                head = reader.until(b"\r\n\r\n")
                headers = _headers(head)
                kind = self._decide()
                if kind == "drop":
                    return
                if kind == "slow_down":
                    # Read the body first, as a server does, so the client reads the answer instead
                    # of a reset; unless it waits for "100 Continue", and so for this final answer.
                    if headers.get("expect", "").lower() != "100-continue":
                        _relay_body(reader, headers, lambda _: None)
                    # A HEAD request's answer has headers only: a body would break the client's parser.
                    client.sendall(SLOW_DOWN_HEAD if head.startswith(b"HEAD ") else SLOW_DOWN_HEAD + SLOW_DOWN_BODY)
                    return  # the answer says Connection: close
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
                upstream.sendall(head)
                _relay_body(reader, headers, upstream.sendall)
        except (_Closed, OSError, ValueError):
            return
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    # shutdown, not only close: it wakes the response pipe blocked in recv on upstream.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


def _relay_body(reader: _Reader, headers: dict[str, str], send: Callable[[bytes], object]) -> None:
    """Pass one request body to ``send``, so the next request on this connection is read from
    where this one ends."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = reader.until(b"\r\n")
            send(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := reader.until(b"\r\n")) != b"\r\n":
                    send(trailer)
                send(b"\r\n")
                return
            send(reader.exactly(size + 2))  # the chunk and its CRLF
    length = int(headers.get("content-length", "0"))
    while length:
        chunk = reader.exactly(min(length, 65536))
        send(chunk)
        length -= len(chunk)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Responses, as they come: a client sends its next request only after reading this one's."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def start_fault_proxy(upstream: str, fault_rate: float, faults: Sequence[Fault] = ("drop", "slow_down"),
                      seed: int = 0) -> FaultProxy:
    """A proxy on a free loopback port in front of ``upstream``, serving from a daemon thread."""
    return FaultProxy(upstream, fault_rate, faults, seed)
