"""A bounded, guarded HTTP client: one deadline per URL, a size cap, no private addresses, opt-out headers."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    allow_private_network: bool = False
    disallowed_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    user_agent_token: str = "img2dataset"
    user_agent: str = "Mozilla/5.0 (compatible; curate/0.1; +https://github.com/curate; img2dataset)"


class FetchError(Exception):
    """A row-level failure: reason is the ledger reason, str(self) the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def is_disallowed(header_values: list[str], token: str, directives: tuple[str, ...]) -> bool:
    """X-Robots-Tag opt-out, as img2dataset reads it: `[agent:] d1, d2`; several headers may appear."""
    for value in header_values:
        agent, _, rest = value.partition(":") if ":" in value.split(",")[0] else ("", "", value)
        agent = agent.strip().lower()
        if agent and agent != token.lower():
            continue
        if any(d.strip().lower() in directives for d in rest.split(",")):
            return True
    return False


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to; refuses loopback, private, link-local and reserved ones unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise FetchError("dns_failed", f"{host}: {error}") from error
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            if _blocked(address):
                raise FetchError("blocked_address", f"{host} resolves to {address}")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the vetted address, so DNS cannot answer differently between check and connect."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = self.raw_socket = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self.raw_socket = self._context.wrap_socket(  # type: ignore[attr-defined]
            sock, server_hostname=self.host
        )


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timeout", f"no complete answer from {url} within the deadline")
    return left


def _read_body(response: http.client.HTTPResponse, sock: socket.socket, policy: FetchPolicy, deadline: float,
               url: str) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > {policy.max_bytes}")
    chunks, total = [], 0
    while True:
        # A per-read timeout alone lets a server trickle one byte a second forever: bound it by the deadline.
        sock.settimeout(_remaining(deadline, url))
        chunk = response.read1(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > policy.max_bytes:
            raise FetchError("too_large", f"body exceeds {policy.max_bytes} bytes")
        chunks.append(chunk)
        _remaining(deadline, url)
    return b"".join(chunks)


def _request(url: str, policy: FetchPolicy, deadline: float) -> tuple[http.client.HTTPResponse, Any]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("invalid_url", f"cannot fetch {url[:200]!r}")
    host = parts.hostname.encode("idna").decode("ascii") if not parts.hostname.isascii() else parts.hostname
    port = parts.port or (443 if scheme == "https" else 80)
    address = resolve(host, port, policy.allow_private_network)
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    connection = cls(host, address, port, timeout=_remaining(deadline, url))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection.request("GET", target, headers={"User-Agent": policy.user_agent, "Accept": "image/*,*/*;q=0.8"})
    return connection.getresponse(), connection


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of url after at most MAX_REDIRECTS redirects; raises FetchError with a ledger reason."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(MAX_REDIRECTS + 1):
        try:
            response, connection = _request(url, policy, deadline)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, UnicodeError, ValueError) as error:
            reason = "timeout" if isinstance(error, TimeoutError) else "connection_failed"
            raise FetchError(reason, f"{type(error).__name__}: {error}") from error
        try:
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise FetchError("http_error", f"HTTP {response.status} {response.reason}")
            if is_disallowed(response.headers.get_all("X-Robots-Tag") or [], policy.user_agent_token,
                             policy.disallowed_directives):
                raise FetchError("opted_out", "X-Robots-Tag: " + ", ".join(response.headers.get_all("X-Robots-Tag")))
            try:
                return _read_body(response, connection.raw_socket, policy, deadline, url)
            except (OSError, http.client.HTTPException) as error:
                reason = "timeout" if isinstance(error, TimeoutError) else "connection_failed"
                raise FetchError(reason, f"{type(error).__name__}: {error}") from error
        finally:
            connection.close()
    raise FetchError("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
