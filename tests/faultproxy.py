"""A TCP proxy for the tests that sits in front of a real server and injects faults: resets,
stalls, and connections cut half way through a request or an answer. With a TLS context it
is also the TLS-terminating reverse proxy of the HTTPS tests."""

from __future__ import annotations

import http.client
import http.server
import random
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Fault:
    """What happens to one connection. kind: ok, reset, cut_request, cut_answer, stall."""

    kind: str = "ok"
    after: int = 0  # bytes forwarded (in the direction that is cut) before the fault
    seconds: float = 0.0  # how long a stall lasts before the connection is closed


class TcpProxy:
    """Listens on a free local port and hands each connection, numbered, to `_serve` on a
    thread of its own. The proxies of the tests are made of it."""

    def __init__(self, upstream_port: int, tls: Optional[ssl.SSLContext] = None) -> None:
        self.upstream_port = upstream_port
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                number = self.connections
                self.connections += 1
            threading.Thread(target=self._serve, args=(client, number), daemon=True).start()

    def _serve(self, client: socket.socket, number: int) -> None:
        raise NotImplementedError


class FaultProxy(TcpProxy):
    def __init__(self, upstream_port: int, plan: Callable[[int], Fault] = lambda n: Fault(),
                 tls: Optional[ssl.SSLContext] = None) -> None:
        self.plan = plan
        self.injected: dict[str, int] = {}
        super().__init__(upstream_port, tls)

    def _count(self, kind: str) -> None:
        with self.lock:
            self.injected[kind] = self.injected.get(kind, 0) + 1

    def _serve(self, client: socket.socket, number: int) -> None:
        fault = self.plan(number)
        if fault.kind == "reset":
            self._count("reset")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        if self.tls:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):
                client.close()
                return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        done = threading.Event()
        threading.Thread(target=self._pump, args=(client, upstream, fault, "cut_request", done),
                         daemon=True).start()
        self._pump(upstream, client, fault, "cut_answer", done)

    def _pump(self, source: socket.socket, sink: socket.socket, fault: Fault, cut: str,
              done: threading.Event) -> None:
        moved = 0
        try:
            while not done.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if fault.kind == "stall" and cut == "cut_answer":
                    self._count("stall")
                    time.sleep(fault.seconds)
                    break
                if fault.kind == cut and moved + len(data) > fault.after:
                    sink.sendall(data[:max(fault.after - moved, 0)])
                    self._count(cut)
                    break
                sink.sendall(data)
                moved += len(data)
        except OSError:
            pass
        finally:
            done.set()
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()


def cycling(*faults: Fault, then: Fault = Fault(), count: Optional[int] = None) -> Callable[[int], Fault]:
    """A plan that repeats `faults` for the first `count` connections (all, if None)."""
    def plan(number: int) -> Fault:
        if count is not None and number >= count:
            return then
        return faults[number % len(faults)]
    return plan


def random_cuts(seed: int, low: int, high: int) -> Callable[[int], Fault]:
    """Every connection is cut in one direction or the other after low..high bytes."""
    generator = random.Random(seed)

    def plan(number: int) -> Fault:
        return Fault(generator.choice(["cut_request", "cut_answer"]),
                     generator.randint(low, high))
    return plan


Answer = tuple[int, str, bytes]  # status, Content-Type, body


class AnswerProxy:
    """An HTTP proxy in front of a real server that answers some requests itself, as a server
    or a proxy that misbehaves would: `rule(method, path)` (path without its query) gives an
    answer, or None to pass the request on. Each request passed on goes to the server on a
    connection of its own; the client's connection is kept alive. `answered` lists what the
    proxy answered itself, as (method, path, status)."""

    def __init__(self, upstream_port: int,
                 rule: Callable[[str, str], Optional[Answer]]) -> None:
        self.upstream_port, self.rule = upstream_port, rule
        self.answered: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswerHandler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _AnswerHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *arguments: object) -> None:
        pass

    def body(self) -> Optional[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_request(self) -> None:
        proxy: AnswerProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self.body()
        path = self.path.split("?")[0]
        own = proxy.rule(self.command, path)
        if own is not None:
            with proxy.lock:
                proxy.answered.append((self.command, path, own[0]))
            self.answer(own[0], [("Content-Type", own[1])], own[2])
            return
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
        skip = {"transfer-encoding", "connection", "content-length", "host"}
        try:
            upstream.request(self.command, self.path, body=body, headers={
                name: value for name, value in self.headers.items() if name.lower() not in skip})
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        skip |= {"server", "date"}
        self.answer(response.status, [(name, value) for name, value in response.getheaders()
                                      if name.lower() not in skip], data)

    do_GET = do_POST = do_PUT = do_DELETE = handle_request  # noqa: N815
