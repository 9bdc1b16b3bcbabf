"""Connections that go where they were vetted and end at their URL's deadline.

A pinned connection opens a socket to the address the fetch guard checked (never to a second DNS answer) while
speaking to the host name (Host header, TLS server name); one watchdog thread per process shuts a connection's
socket at the deadline of the URL it serves, so headers or a body trickled a byte at a time cannot outlive it.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import os
import socket
import ssl
import threading
import time
from functools import cache


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """One thread per process that shuts each armed socket at its deadline.

    A threading.Timer per request would start a thread per URL: a thread start waits for the new thread to run,
    about a millisecond on a busy machine, while the host's slot is held.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has no watchdog thread (and a fresh lock)

    def _reset(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._armed: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, deadline: float) -> int:
        """Shut sock at deadline unless disarm(token) comes first."""
        with self._condition:
            token = next(self._tokens)
            heapq.heappush(self._heap, (deadline, token, sock))
            self._armed.add(token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="curate-watchdog")
                self._thread.start()
            elif self._heap[0][1] == token:  # earlier than what the thread sleeps until
                self._condition.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._condition:
            self._armed.discard(token)

    def _run(self) -> None:
        while True:
            due: list[socket.socket] = []
            with self._condition:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][1] not in self._armed):
                    _, token, sock = heapq.heappop(self._heap)
                    if token in self._armed:
                        self._armed.discard(token)
                        due.append(sock)
                if not due:
                    self._condition.wait(self._heap[0][0] - now if self._heap else None)
            for sock in due:
                _shut(sock)


WATCHDOG = Watchdog()


@cache
def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The system's certificate authorities plus ca_bundle's; one per process (loading them costs milliseconds)."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the vetted address, so DNS cannot answer differently between check and connect.

    A watchdog shuts the socket at the deadline of the URL it serves: headers or a body trickled a byte at a time
    cannot outlive it. A kept-alive connection serves one URL at a time and is armed again for each.
    """

    def __init__(self, host: str, address: str, port: int, deadline: float, ca_bundle: str | None = None) -> None:
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self._address, self._deadline, self.ca_bundle = address, deadline, ca_bundle
        self._watchdog: int | None = None
        self.raw_socket: socket.socket | None = None

    def _arm(self, sock: socket.socket) -> socket.socket:
        self.rest()
        self._watchdog = WATCHDOG.arm(sock, self._deadline)
        return sock

    def serve(self, deadline: float) -> None:
        """Take on the next URL: its deadline bounds every read and the watchdog from now on."""
        self._deadline, self.timeout = deadline, max(deadline - time.monotonic(), 0.001)
        if self.raw_socket is not None:
            self.raw_socket.settimeout(self.timeout)
            self._arm(self.raw_socket)

    def rest(self) -> None:
        """Between URLs: no watchdog (the idle pool drops connections a server closed)."""
        if self._watchdog is not None:
            WATCHDOG.disarm(self._watchdog)
            self._watchdog = None

    def connect(self) -> None:
        self.sock = self.raw_socket = self._arm(socket.create_connection((self._address, self.port), self.timeout))

    def close(self) -> None:
        self.rest()
        super().close()


class PinnedHTTPSConnection(PinnedHTTPConnection):
    default_port = 443

    def connect(self) -> None:
        plain = self._arm(socket.create_connection((self._address, self.port), self.timeout))  # bounds the handshake
        wrapped = tls_context(self.ca_bundle).wrap_socket(plain, server_hostname=self.host)
        self.sock = self.raw_socket = self._arm(wrapped)  # wrapping detaches `plain`: watch the TLS socket
