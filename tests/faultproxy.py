"""A TCP proxy for the tests that sits in front of a real server and injects faults: resets,
stalls, and connections cut half way through a request or an answer. With a TLS context it
is also the TLS-terminating reverse proxy of the HTTPS tests."""

from __future__ import annotations

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
