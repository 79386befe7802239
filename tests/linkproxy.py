"""A TCP proxy that puts a distant link between the tool and a real server: every chunk is
delayed by half the round trip in each direction, a new connection waits one round trip (the
TCP handshake) before its first byte goes, and each direction's rate is shared by all the
connections that cross it, as on one congested link.

Two ways of sharing it:
- fair (the default): a connection puts its next chunk on the link only once its last one
  has left, so the connections take turns chunk by chunk and a new request waits for about
  one chunk of each other connection;
- deep (`depth` bytes): one FIFO queue per direction, in which each connection may have up to
  `depth` bytes waiting, and the bytes leave in the order they arrived, whoever sent them. So
  behave many VPN concentrators and WAN routers (bufferbloat): a new request waits behind
  everything queued before it, a second or more at several MB per connection.

Used by the WAN tests and the benchmark's `wan` part; the kernel here has no netem.

CappedProxy is the stand-in for a target larger than this machine (a many-core server, or a
cluster of Orthanc nodes behind a load balancer): next to the tool, it serves each connection
at most `per_connection` bytes a second and all of them together at most `total`, as a server
that handles each request in one thread of many. One upload then gets a fraction of what the
server can take; only several at once fill it."""

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


class Capacity:
    """What a connection may take of a server: its own rate and a share of the total. A block
    leaves once both have had the time to send it, so one connection never goes faster than
    `own` and all of them together never faster than `shared`."""

    def __init__(self, own: Direction, shared: Direction) -> None:
        self.own, self.shared = own, shared

    def occupy(self, count: int) -> float:
        return max(self.own.occupy(count), self.shared.occupy(count))


class LinkProxy(TcpProxy):
    def __init__(self, upstream_port: int, rtt: float, rate: float,
                 depth: Optional[int] = None) -> None:
        self.rtt = rtt
        self.depth = depth  # bytes a connection may have queued (deep mode), or None (fair)
        self.up = Direction(rate)  # towards the server
        self.down = Direction(rate)  # towards the client
        super().__init__(upstream_port)

    def _serve(self, client: socket.socket, number: int) -> None:
        accepted = time.monotonic()
        pair = open_upstream(client, self.upstream_port)
        if pair is None:
            return
        upstream, closing = pair
        # The handshake: the client's first byte can leave one round trip after it connected.
        Pump(client, upstream, self.up, self.rtt / 2, accepted + self.rtt, closing,
             self.depth).start()
        Pump(upstream, client, self.down, self.rtt / 2, 0.0, closing, self.depth).start()


def open_upstream(client: socket.socket,
                  port: int) -> "Optional[tuple[socket.socket, Closing]]":
    """The connection to the server for a client's, both without Nagle's delay, and what
    closes them; None, the client's closed, if the server refuses it."""
    try:
        upstream = socket.create_connection(("127.0.0.1", port))
    except OSError:
        client.close()
        return None
    for end in (client, upstream):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return upstream, Closing((client, upstream))


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
    trip after it left. The reader waits for its chunk to leave before reading the next
    (fair), or only while the connection has `depth` bytes queued (deep)."""

    def __init__(self, source: socket.socket, sink: socket.socket, link: Direction,
                 delay: float, not_before: float, closing: Closing,
                 depth: Optional[int] = None) -> None:
        self.source, self.sink, self.link, self.delay = source, sink, link, delay
        self.not_before, self.closing, self.depth = not_before, closing, depth
        self.queue: deque[tuple[float, Optional[bytes]]] = deque()
        self.ready = threading.Condition()
        self.waiting: deque[tuple[float, int]] = deque()  # (when it leaves, bytes) queued
        self.waiting_bytes = 0

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
                if self.depth is None:
                    wait = sent - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                else:
                    self.waiting.append((sent, len(data)))
                    self.waiting_bytes += len(data)
                    while self.waiting and (self.waiting_bytes > self.depth
                                            or self.waiting[0][0] <= time.monotonic()):
                        left, count = self.waiting[0]
                        wait = left - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                        self.waiting.popleft()
                        self.waiting_bytes -= count
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


class CappedProxy(TcpProxy):
    """A server's capacity in front of a real server (see the module's docstring): no delay,
    each connection at `per_connection` bytes a second in each direction, all of them at
    `total`."""

    def __init__(self, upstream_port: int, per_connection: float, total: float) -> None:
        self.per_connection = per_connection
        self.up, self.down = Direction(total), Direction(total)
        super().__init__(upstream_port)

    def _serve(self, client: socket.socket, number: int) -> None:
        pair = open_upstream(client, self.upstream_port)
        if pair is None:
            return
        upstream, closing = pair
        for source, sink, shared in ((client, upstream, self.up), (upstream, client, self.down)):
            Pump(source, sink, Capacity(Direction(self.per_connection), shared), 0.0, 0.0,
                 closing).start()
