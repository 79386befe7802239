"""A TCP proxy that puts a distant link between the tool and a real server: every chunk is
delayed by half the round trip in each direction, a new connection waits one round trip (the
TCP handshake) before its first byte goes, and each direction's rate is shared by all the
connections that cross it, first come first served, as on one congested link.

Used by the WAN tests and the benchmark's `wan` part; the kernel here has no netem."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Optional

from faultproxy import TcpProxy

CHUNK = 64 * 1024


class Direction:
    """One direction of the link: a queue that sends `rate` bytes a second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.free_at = 0.0  # when the link has sent all it was given
        self.moved = 0

    def occupy(self, count: int) -> float:
        """Take the link for `count` bytes; return when their last byte has left."""
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + count / self.rate
            self.moved += count
            return self.free_at


class LinkProxy(TcpProxy):
    def __init__(self, upstream_port: int, rtt: float, rate: float) -> None:
        self.rtt = rtt
        self.up = Direction(rate)  # towards the server
        self.down = Direction(rate)  # towards the client
        super().__init__(upstream_port)

    def _serve(self, client: socket.socket, number: int) -> None:
        accepted = time.monotonic()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        for end in (client, upstream):
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        closing = Closing((client, upstream))
        # The handshake: the client's first byte can leave one round trip after it connected.
        Pump(client, upstream, self.up, self.rtt / 2, accepted + self.rtt, closing).start()
        Pump(upstream, client, self.down, self.rtt / 2, 0.0, closing).start()


class Closing:
    """Closes both sockets once both directions are done."""

    def __init__(self, ends: tuple[socket.socket, socket.socket]) -> None:
        self.ends = ends
        self.left = 2
        self.lock = threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            for end in self.ends:
                end.close()


class Pump:
    """Moves one direction of one connection: a reader takes the link for each chunk it
    reads (so a full link slows the sender down), a writer delivers each chunk half a round
    trip after it left."""

    def __init__(self, source: socket.socket, sink: socket.socket, link: Direction,
                 delay: float, not_before: float, closing: Closing) -> None:
        self.source, self.sink, self.link, self.delay = source, sink, link, delay
        self.not_before, self.closing = not_before, closing
        self.queue: deque[tuple[float, Optional[bytes]]] = deque()
        self.ready = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _put(self, due: float, data: Optional[bytes]) -> None:
        with self.ready:
            self.queue.append((due, data))
            self.ready.notify()

    def _read(self) -> None:
        try:
            while True:
                data = self.source.recv(CHUNK)
                if not data:
                    break
                wait = self.not_before - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                sent = self.link.occupy(len(data))
                wait = sent - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._put(sent + self.delay, data)
        except OSError:
            pass
        self._put(time.monotonic() + self.delay, None)

    def _write(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.queue:
                        self.ready.wait()
                    due, data = self.queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if data is None:
                    self.sink.shutdown(socket.SHUT_WR)
                    break
                self.sink.sendall(data)
        except OSError:
            pass
        self.closing.done()
