"""A bounded, guarded HTTP client: one deadline per URL, a size cap, network scopes, opt-out headers.

Traps of the usual clients it avoids: urllib's timeout bounds each socket read, not the download (a server that
trickles a byte a second never times out), so a watchdog shuts the socket at the URL's deadline; urllib reads
file: and data: URLs, so only http/https reach the network code; a check-then-connect on a host name can be
answered differently by DNS the second time, so the connection goes to the address that was checked, and every
redirect hop is checked again.

Network scopes: public addresses are always fetched; loopback opens with allow_loopback, loopback and private
ranges with allow_private_network, link-local ranges and the cloud metadata service only with allow_link_local;
reserved, multicast and unspecified addresses never.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
# Directives that carry a value after a colon; any other `name:` prefix in X-Robots-Tag names a user agent.
VALUED_DIRECTIVES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}
_SAFE_PATH = "/%!$&'()*+,;=:@-._~"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_PRIVATE_NETWORKS = tuple(ipaddress.ip_network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                                "fc00::/7"))
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254"))
METADATA_HOSTS = frozenset({"metadata.google.internal"})
PUBLIC, LOOPBACK, PRIVATE, LINK_LOCAL = "public", "loopback", "private-network", "link-local"
SCOPE_OPTIONS = {LOOPBACK: "--allow-loopback", PRIVATE: "--allow-private-network", LINK_LOCAL: "--allow-link-local"}


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    allow_private_network: bool = False  # loopback and private ranges
    allow_loopback: bool = False
    allow_link_local: bool = False  # link-local ranges and the cloud metadata service
    disallowed_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    user_agent_token: str = "img2dataset"
    user_agent: str = "Mozilla/5.0 (compatible; curate/0.1; +https://github.com/curate; img2dataset)"

    def opens(self, scope: str) -> bool:
        """Whether URLs may reach addresses of scope (PUBLIC, LOOPBACK, PRIVATE or LINK_LOCAL)."""
        if scope == LOOPBACK:
            return self.allow_loopback or self.allow_private_network
        if scope == PRIVATE:
            return self.allow_private_network
        return scope == PUBLIC or (scope == LINK_LOCAL and self.allow_link_local)


class FetchError(Exception):
    """A row-level failure: reason is the ledger reason, str(self) the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def is_transient(reason: str | None, detail: str | None) -> bool:
    """Failures worth another attempt later: timeouts, refused or reset connections, DNS, HTTP 429 and 5xx."""
    if reason in ("timeout", "connection_failed", "dns_failed"):
        return True
    return reason == "http_error" and (detail or "").startswith(("HTTP 5", "HTTP 429"))


def is_disallowed(header_values: list[str], token: str, directives: tuple[str, ...]) -> bool:
    """X-Robots-Tag opt-out: `[agent:] d1, d2, ...`; several headers may appear, valued directives do not end it.

    img2dataset splits each header at its first colon, so `noai, max-image-preview:large` hides the noai; here an
    item `name: rest` switches the agent only when name is not a valued directive such as max-image-preview.
    """
    token = token.lower()
    for value in header_values:
        agent = ""
        for item in value.split(","):
            item = item.strip().lower()
            name, colon, rest = item.partition(":")
            if colon and name.strip() not in VALUED_DIRECTIVES:
                agent, item = name.strip(), rest.strip()
            if agent in ("", "*", token) and item in directives:
                return True
    return False


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address.split("%")[0])


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo): where its packets end up."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
    if embedded is None and ip in _NAT64:
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return embedded


def _is_metadata(address: str) -> bool:
    ip = _parse(address)
    return ip in METADATA_ADDRESSES or _embedded_ipv4(ip) in METADATA_ADDRESSES


def address_scope(address: str) -> str | None:
    """PUBLIC, LOOPBACK, PRIVATE or LINK_LOCAL; None for what no option opens (reserved, multicast, unspecified)."""
    ip = _parse(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d itself on a dual-stack socket
            return address_scope(str(ip.ipv4_mapped))
        # An IPv4 address carried inside IPv6 (NAT64, 6to4, Teredo) is judged as that IPv4 address.
        embedded = _embedded_ipv4(ip)
        if embedded is not None and (inner := address_scope(str(embedded))) != PUBLIC:
            return inner
        if ip in _IPV4_COMPATIBLE and not ip.is_loopback:  # deprecated ::a.b.c.d, tunnelled to a.b.c.d by sit0
            return None
    if ip in METADATA_ADDRESSES or ip.is_link_local:
        return LINK_LOCAL
    if ip.is_loopback:
        return LOOPBACK
    if any(ip in network for network in _PRIVATE_NETWORKS):
        return PRIVATE
    return PUBLIC if ip.is_global and not ip.is_multicast else None


def _blocked(address: str) -> bool:
    """Whether address needs an option or is never allowed (the hostile tests patch it to make a server public)."""
    return address_scope(address) != PUBLIC


def refusal(destination: str, policy: FetchPolicy) -> str | None:
    """Why policy forbids a host name or address, naming the option that would allow it; None when allowed.

    A host name is judged by name only (the cloud metadata service's); its addresses are judged after DNS.
    """
    try:
        _parse(destination)
    except ValueError:
        if destination.rstrip(".").lower() in METADATA_HOSTS and not policy.allow_link_local:
            return f"{destination} is the cloud metadata service: refused unless {SCOPE_OPTIONS[LINK_LOCAL]}"
        return None
    why = _address_refusal(destination, policy)
    return None if why is None else f"{destination} is {why}"


def _address_refusal(address: str, policy: FetchPolicy) -> str | None:
    if not _blocked(address):
        return None
    scope = address_scope(address)
    if scope is None:
        return "a reserved, multicast or unspecified address, which no option allows"
    if policy.opens(scope):
        return None
    kind = "the cloud metadata service's address" if _is_metadata(address) else f"a {scope} address"
    return f"{kind}: refused unless {SCOPE_OPTIONS[scope]}"


def _lookup(host: str, port: int, timeout: float) -> list[Any]:
    """getaddrinfo bounded by the URL's deadline (the resolver's own retries can take far longer)."""
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except ValueError:
        pass
    answer: dict[str, Any] = {}

    def work() -> None:
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as error:  # handed to the caller's thread
            answer["error"] = error

    worker = threading.Thread(target=work, daemon=True, name="curate-dns")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise FetchError("timeout", f"DNS lookup of {host} did not finish within the deadline")
    if "error" in answer:
        raise answer["error"]
    return answer["infos"]


def resolve(host: str, port: int, policy: FetchPolicy, timeout: float = 10.0) -> str:
    """The address to connect to; refuses a host, or any of its addresses, that policy's network scopes do not open."""
    reason = refusal(host, policy)  # before DNS: the metadata host name is refused without asking anyone
    if reason is not None:
        raise FetchError("blocked_address", reason)
    try:
        infos = _lookup(host, port, timeout)
    except (socket.gaierror, UnicodeError) as error:
        raise FetchError("dns_failed", f"{host}: {error}") from error
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise FetchError("dns_failed", f"{host}: no address")
    for address in addresses:
        why = _address_refusal(address, policy)
        if why is not None:
            raise FetchError("blocked_address", f"{host} resolves to {address}, {why}")
    return addresses[0]


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the vetted address, so DNS cannot answer differently between check and connect.

    A watchdog shuts the socket at the deadline: headers or a body trickled a byte at a time cannot outlive it.
    """

    def __init__(self, host: str, address: str, port: int, deadline: float) -> None:
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self._address, self._deadline = address, deadline
        self._watchdog: threading.Timer | None = None

    def _arm(self, sock: socket.socket) -> socket.socket:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = threading.Timer(max(self._deadline - time.monotonic(), 0.0), _shut, [sock])
        self._watchdog.daemon = True
        self._watchdog.start()
        return sock

    def connect(self) -> None:
        self.sock = self.raw_socket = self._arm(socket.create_connection((self._address, self.port), self.timeout))

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        super().close()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def connect(self) -> None:
        plain = self._arm(socket.create_connection((self._address, self.port), self.timeout))  # bounds the handshake
        wrapped = ssl.create_default_context().wrap_socket(plain, server_hostname=self.host)
        self.sock = self.raw_socket = self._arm(wrapped)  # wrapping detaches `plain`: watch the TLS socket


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timeout", f"no complete answer from {url[:200]} within the deadline")
    return left


def _read_body(response: http.client.HTTPResponse, sock: socket.socket, policy: FetchPolicy, deadline: float,
               url: str) -> bytes:
    """The body, streamed in chunks and abandoned as soon as it passes the size cap."""
    length = response.getheader("Content-Length", "").strip()
    if length.isdigit() and int(length) > policy.max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > {policy.max_bytes}")
    chunks, total = [], 0
    while True:
        sock.settimeout(_remaining(deadline, url))
        chunk = response.read1(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > policy.max_bytes:
            raise FetchError("too_large", f"body exceeds {policy.max_bytes} bytes")
        chunks.append(chunk)
    _remaining(deadline, url)  # the watchdog ends a late body early: that is a timeout, not a short image
    if response.length:
        raise FetchError("connection_failed", f"body ended after {total} of {length} bytes")
    return b"".join(chunks)


def _target(parts: Any) -> str:
    """Path and query as sent: non-ASCII percent-encoded as UTF-8, existing escapes kept."""
    path = quote(parts.path or "/", safe=_SAFE_PATH)
    return path + (f"?{quote(parts.query, safe=_SAFE_PATH + '?')}" if parts.query else "")


def _connect(url: str, policy: FetchPolicy, deadline: float) -> _PinnedHTTPConnection:
    try:
        parts = urlsplit(url)
        scheme, hostname, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError as error:
        raise FetchError("invalid_url", f"{url[:200]!r}: {error}") from error
    if scheme not in ("http", "https") or not hostname:
        raise FetchError("invalid_url", f"cannot fetch {url[:200]!r}: only http(s) URLs with a host")
    try:
        host = hostname if hostname.isascii() else hostname.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise FetchError("invalid_url", f"host {hostname[:200]!r} is not a valid IDN: {error}") from error
    port = port or (443 if scheme == "https" else 80)
    address = resolve(host, port, policy, _remaining(deadline, url))
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    connection = cls(host, address, port, deadline)
    try:
        connection.request("GET", _target(parts), headers={"User-Agent": policy.user_agent,
                                                           "Accept": "image/*,*/*;q=0.8"})
    except BaseException:
        connection.close()
        raise
    return connection


def _network_error(error: Exception, deadline: float) -> FetchError:
    late = isinstance(error, TimeoutError) or time.monotonic() >= deadline
    return FetchError("timeout" if late else "connection_failed", f"{type(error).__name__}: {error}"[:500])


def _answer(connection: _PinnedHTTPConnection, url: str, policy: FetchPolicy, deadline: float) -> bytes | str:
    """The body, or the next URL when the answer is a redirect."""
    response = connection.getresponse()
    location = response.getheader("Location")
    if response.status in (301, 302, 303, 307, 308) and location:
        return urljoin(url, location.strip())
    if response.status != 200:
        raise FetchError("http_error", f"HTTP {response.status} {response.reason}"[:200])
    robots = response.headers.get_all("X-Robots-Tag") or []
    if is_disallowed(robots, policy.user_agent_token, policy.disallowed_directives):
        raise FetchError("opted_out", ("X-Robots-Tag: " + ", ".join(robots))[:500])
    return _read_body(response, connection.raw_socket, policy, deadline, url)


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of url after at most MAX_REDIRECTS redirects; raises FetchError with a ledger reason."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(MAX_REDIRECTS + 1):
        connection = None
        try:
            connection = _connect(url, policy, deadline)
            answer = _answer(connection, url, policy, deadline)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, UnicodeError, ValueError) as error:
            raise _network_error(error, deadline) from error
        finally:
            if connection is not None:
                connection.close()
        if isinstance(answer, bytes):
            return answer
        url = answer
    raise FetchError("too_many_redirects", f"more than {MAX_REDIRECTS} redirects, the last to {url[:200]}")
