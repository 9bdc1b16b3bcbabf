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

import email.utils
import http.client
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import quote, urljoin, urlsplit

from curate.net.connection import PinnedHTTPConnection, PinnedHTTPSConnection

MAX_REDIRECTS = 5
MAX_PAUSES = 3  # 429/503 Retry-After waits per URL, all within its deadline
IDLE_SECONDS = 15.0  # a kept-alive connection idle longer is closed, not reused
FAILURES_BEFORE_BACKOFF, MAX_BACKOFF = 3, 60.0  # a host failing this often in a row rests, doubling
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
    disallowed_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex", "noml")
    honour_tdm_header: bool = True  # W3C TDMRep: a `tdm-reservation: 1` response header opts the resource out
    truncate: bool = False  # a body past max_bytes is cut there instead of refused (robots.txt: RFC 9309 2.5)
    user_agent_token: str = "img2dataset"
    user_agent: str = "Mozilla/5.0 (compatible; curate/0.1; +https://github.com/curate; img2dataset)"
    ca_bundle: str | None = None  # PEM of extra certificate authorities, trusted besides the system's

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


@lru_cache(maxsize=1 << 16)
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


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timeout", f"no complete answer from {url[:200]} within the deadline")
    return left


def _read_body(response: http.client.HTTPResponse, sock: socket.socket, policy: FetchPolicy, deadline: float,
               url: str) -> bytes:
    """The body, streamed in chunks and abandoned as soon as it passes the size cap."""
    length = response.getheader("Content-Length", "").strip()
    if length.isdigit() and int(length) > policy.max_bytes and not policy.truncate:
        raise FetchError("too_large", f"Content-Length {length} > {policy.max_bytes}")
    chunks, total = [], 0
    while True:
        sock.settimeout(_remaining(deadline, url))
        chunk = response.read1(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > policy.max_bytes and policy.truncate:
            chunks.append(chunk[:len(chunk) - (total - policy.max_bytes)])
            return b"".join(chunks)  # the rest is never read: the connection is closed, not kept alive
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


class _Origin(NamedTuple):
    scheme: str
    host: str  # ASCII (IDNA), lower case
    port: int
    target: str  # path and query as sent


def _origin(url: str) -> _Origin:
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
    return _Origin(scheme, host.lower(), port or (443 if scheme == "https" else 80), _target(parts))


class _Pause(NamedTuple):
    """A 429 or 503 with Retry-After: ask again after seconds."""
    status: int
    seconds: float


class _Host:
    """One host's slots and health: consecutive failures and the time before which it is not asked again."""

    def __init__(self, limit: int) -> None:
        self.slots = threading.BoundedSemaphore(limit)
        self.failures = 0
        self.last_failure: FetchError | None = None
        self.not_before = 0.0


class Session:
    """What the threads of one download share: at most max_per_host requests in flight to a host (scheme, name,
    port), kept-alive connections, Retry-After pauses and a backoff for hosts that keep failing.

    A kept-alive connection is reused only by a request whose own DNS answer, checked against its own policy, is
    the address that connection was opened to, for the same host name (and so the same TLS server name): reuse
    never reaches an address the guard would refuse now.
    """

    def __init__(self, max_per_host: int = 4, idle_seconds: float = IDLE_SECONDS) -> None:
        self.max_per_host, self.idle_seconds = max_per_host, idle_seconds
        self._lock = threading.Lock()
        self._hosts: dict[tuple[str, str, int], _Host] = {}
        self._idle: dict[tuple[Any, ...], list[tuple[float, PinnedHTTPConnection]]] = {}

    def host(self, origin: _Origin) -> _Host:
        with self._lock:
            return self._hosts.setdefault(origin[:3], _Host(self.max_per_host))

    def take(self, key: tuple[Any, ...]) -> PinnedHTTPConnection | None:
        """A kept-alive connection opened for key (scheme, host, port, address, CA bundle), if one is idle."""
        stale: list[PinnedHTTPConnection] = []
        found = None
        with self._lock:
            idle = self._idle.get(key, [])
            while idle and found is None:
                since, connection = idle.pop()
                (found := connection) if time.monotonic() - since < self.idle_seconds else stale.append(connection)
        for connection in stale:
            connection.close()
        return found

    def give(self, key: tuple[Any, ...], connection: PinnedHTTPConnection) -> None:
        connection.rest()
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_per_host:
                idle.append((time.monotonic(), connection))
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, connection in connections:
                connection.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _network_error(error: Exception, deadline: float) -> FetchError:
    late = isinstance(error, TimeoutError) or time.monotonic() >= deadline
    return FetchError("timeout" if late else "connection_failed", f"{type(error).__name__}: {error}"[:500])


def _retry_after(response: http.client.HTTPResponse) -> float | None:
    """Seconds a 429 or 503 asks the client to wait (delta-seconds or an HTTP date); None without a usable header."""
    value = (response.getheader("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None


def _exchange(session: Session, origin: _Origin, address: str, policy: FetchPolicy, deadline: float,
              url: str) -> bytes | str | _Pause:
    """One request: the body, the next URL of a redirect, or the pause a 429/503 asks for."""
    key = (origin.scheme, origin.host, origin.port, address, policy.ca_bundle)
    for reused in (True, False):
        connection = session.take(key) if reused else None
        if reused and connection is None:
            continue
        if connection is None:
            cls = PinnedHTTPSConnection if origin.scheme == "https" else PinnedHTTPConnection
            connection = cls(origin.host, address, origin.port, deadline, policy.ca_bundle)
        keep = False
        try:
            connection.serve(deadline)
            connection.request("GET", origin.target, headers={"User-Agent": policy.user_agent,
                                                               "Accept": "image/*,*/*;q=0.8"})
            response = connection.getresponse()
            answer = _answer(response, connection, url, policy, deadline)
            cut = policy.truncate and isinstance(answer, bytes) and len(answer) >= policy.max_bytes  # body left unread
            keep = isinstance(answer, bytes) and not response.will_close and not cut
            if keep:
                response.close()  # the body is read: the socket stays open for the next request
            return answer
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, http.client.BadStatusLine):
            if not reused:  # a kept-alive connection the server had closed: ask again on a new one
                raise
        finally:
            (session.give(key, connection) if keep else connection.close())
    raise AssertionError("unreachable")


def _answer(response: http.client.HTTPResponse, connection: PinnedHTTPConnection, url: str, policy: FetchPolicy,
            deadline: float) -> bytes | str | _Pause:
    location = response.getheader("Location")
    if response.status in (301, 302, 303, 307, 308) and location:
        return urljoin(url, location.strip())
    if response.status in (429, 503) and (wait := _retry_after(response)) is not None:
        return _Pause(response.status, wait)
    if response.status != 200:
        raise FetchError("http_error", f"HTTP {response.status} {response.reason}"[:200])
    robots = response.headers.get_all("X-Robots-Tag") or []
    if is_disallowed(robots, policy.user_agent_token, policy.disallowed_directives):
        raise FetchError("opted_out", ("X-Robots-Tag: " + ", ".join(robots))[:500])
    if policy.honour_tdm_header and (response.getheader("tdm-reservation") or "").strip() == "1":
        raise FetchError("tdm_reserved", "tdm-reservation: 1 (W3C TDMRep response header)")
    assert connection.raw_socket is not None
    return _read_body(response, connection.raw_socket, policy, deadline, url)


def _health(host: _Host, error: FetchError | None) -> None:
    """Count a host's consecutive failures; from the third on it rests for 1, 2, 4 ... up to MAX_BACKOFF seconds."""
    if error is None:
        host.failures, host.last_failure = 0, None
    elif is_transient(error.reason, str(error)):
        host.failures, host.last_failure = host.failures + 1, error
        if host.failures >= FAILURES_BEFORE_BACKOFF:
            pause = min(MAX_BACKOFF, 2.0 ** (host.failures - FAILURES_BEFORE_BACKOFF))
            host.not_before = max(host.not_before, time.monotonic() + pause)


def _wait_for(host: _Host, origin: _Origin, deadline: float) -> None:
    """Sleep through the host's rest (a backoff or a Retry-After) when it ends within the deadline; else fail now."""
    rest = host.not_before - time.monotonic()
    if rest <= 0:
        return
    if time.monotonic() + rest >= deadline:
        why = host.last_failure
        detail = f"{why or 'Retry-After'} ({origin.host} rests {rest:.1f} s more, {host.failures} failures in a row)"
        raise FetchError(why.reason if why else "http_error", detail[:500])
    time.sleep(rest)


def fetch(url: str, policy: FetchPolicy, session: Session | None = None) -> bytes:
    """The body of url after at most MAX_REDIRECTS redirects; raises FetchError with a ledger reason.

    With a session, the per-URL deadline starts when the first host grants a slot.
    """
    session = session if session is not None else Session(max_per_host=1 << 16, idle_seconds=0.0)
    deadline: float | None = None
    hops, pauses = 0, 0
    while True:
        origin = _origin(url)
        reason = refusal(origin.host, policy)  # before waiting for a slot: a refused name costs nobody anything
        if reason is not None:
            raise FetchError("blocked_address", reason)
        host = session.host(origin)
        if deadline is None:
            host.slots.acquire()
            deadline = time.monotonic() + policy.timeout
        elif not host.slots.acquire(timeout=_remaining(deadline, url)):
            raise FetchError("timeout", f"no free slot for {origin.host} within the deadline")
        try:
            answer = _hop(session, host, origin, policy, deadline, url)
        finally:
            host.slots.release()
        if isinstance(answer, bytes):
            return answer
        if isinstance(answer, str):
            hops, url = hops + 1, answer
            if hops > MAX_REDIRECTS:
                raise FetchError("too_many_redirects", f"more than {MAX_REDIRECTS} redirects, the last to {url[:200]}")
            continue
        pauses += 1
        if pauses > MAX_PAUSES or time.monotonic() + answer.seconds >= deadline:
            raise FetchError("http_error", f"HTTP {answer.status} with Retry-After {answer.seconds:.0f} s: past the "
                                           f"deadline, or more than {MAX_PAUSES} waits")


def _hop(session: Session, host: _Host, origin: _Origin, policy: FetchPolicy, deadline: float,
         url: str) -> bytes | str | _Pause:
    """One hop under the host's slot: rest if asked to, resolve and check, exchange, and keep the host's health."""
    _wait_for(host, origin, deadline)
    try:
        address = resolve(origin.host, origin.port, policy, _remaining(deadline, url))
        answer = _exchange(session, origin, address, policy, deadline, url)
    except FetchError as error:
        _health(host, error)
        raise
    except (OSError, http.client.HTTPException, UnicodeError, ValueError) as error:
        failure = _network_error(error, deadline)
        _health(host, failure)
        raise failure from error
    if isinstance(answer, _Pause):  # the host asked everyone to wait: a failure, and a rest of that length
        _health(host, FetchError("http_error", f"HTTP {answer.status} with Retry-After {answer.seconds:.0f} s"))
        host.not_before = max(host.not_before, time.monotonic() + answer.seconds)
    else:
        _health(host, None)
    return answer
