"""No fetch reaches an address it must not: every spelling of a private address, DNS answers, redirect hops."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from curate.net import fetch as fetch_module
from curate.net.fetch import FetchError, FetchPolicy, fetch, refusal, resolve
from curate.testing.server import ImageServer, Response, _Handler
from tests.hostile.conftest import ORIGIN_FILES, jpeg, outcomes, row, run_rows, serve

BLOCKED_ADDRESSES = ["127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "169.254.169.254",
                     "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1",
                     "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1",
                     "2002:7f00:1::1"]


@pytest.mark.parametrize("address", BLOCKED_ADDRESSES)
def test_private_and_special_addresses_are_blocked(address: str) -> None:
    assert fetch_module._blocked(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    assert not fetch_module._blocked(address)


POLICIES = {"no option": FetchPolicy(), "--allow-loopback": FetchPolicy(allow_loopback=True),
            "--allow-private-network": FetchPolicy(allow_private_network=True),
            "--allow-link-local": FetchPolicy(allow_link_local=True)}
LOOPBACK = {"--allow-loopback", "--allow-private-network"}
# Destination -> the options that open it; every other option (and none) must refuse it.
SCOPE_TABLE: dict[str, set[str]] = {
    "127.0.0.1": LOOPBACK, "127.5.5.5": LOOPBACK, "::1": LOOPBACK, "::ffff:127.0.0.1": LOOPBACK,
    "10.0.0.1": {"--allow-private-network"}, "172.16.0.1": {"--allow-private-network"},
    "172.31.255.254": {"--allow-private-network"}, "192.168.1.1": {"--allow-private-network"},
    "fd12::1": {"--allow-private-network"}, "::ffff:10.0.0.1": {"--allow-private-network"},
    "169.254.169.254": {"--allow-link-local"}, "169.254.1.1": {"--allow-link-local"},
    "fd00:ec2::254": {"--allow-link-local"}, "fe80::1": {"--allow-link-local"}, "fe80::1%1": {"--allow-link-local"},
    "::ffff:169.254.169.254": {"--allow-link-local"}, "::ffff:a9fe:a9fe": {"--allow-link-local"},
    "64:ff9b::a9fe:a9fe": {"--allow-link-local"}, "metadata.google.internal": {"--allow-link-local"},
    "METADATA.google.internal.": {"--allow-link-local"},
    "0.0.0.0": set(), "::": set(), "100.64.0.1": set(), "224.0.0.1": set(), "ff02::1": set(),
    "255.255.255.255": set(), "::127.0.0.1": set(), "192.0.2.1": set(),
    "93.184.216.34": set(POLICIES), "2606:4700::1111": set(POLICIES), "example.com": set(POLICIES),
}


@pytest.mark.parametrize("option", list(POLICIES))
@pytest.mark.parametrize("destination", list(SCOPE_TABLE))
def test_each_option_opens_exactly_its_scope(destination: str, option: str) -> None:
    allowed = refusal(destination, POLICIES[option]) is None
    assert allowed == (option in SCOPE_TABLE[destination])


@pytest.mark.parametrize("destination", [d for d, opened in SCOPE_TABLE.items() if opened != set(POLICIES)])
def test_every_option_together_still_refuses_only_the_reserved_addresses(destination: str) -> None:
    everything = FetchPolicy(allow_loopback=True, allow_private_network=True, allow_link_local=True)
    assert (refusal(destination, everything) is None) == bool(SCOPE_TABLE[destination])


@pytest.mark.parametrize(("destination", "wording"), [
    ("127.5.5.5", "127.5.5.5 is a loopback address: refused unless --allow-loopback"),
    ("192.168.1.1", "192.168.1.1 is a private-network address: refused unless --allow-private-network"),
    ("fe80::1", "fe80::1 is a link-local address: refused unless --allow-link-local"),
    ("::ffff:169.254.169.254", "the cloud metadata service's address: refused unless --allow-link-local"),
    ("metadata.google.internal", "metadata.google.internal is the cloud metadata service: refused unless "
                                 "--allow-link-local"),
    ("224.0.0.1", "224.0.0.1 is a reserved, multicast or unspecified address, which no option allows"),
])
def test_a_refusal_names_the_option_that_would_allow_it(destination: str, wording: str) -> None:
    reason = refusal(destination, FetchPolicy())
    assert reason is not None and wording in reason


def test_the_metadata_host_name_is_refused_before_dns(fake_dns: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    answer = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: asked.append(host) or answer(host, *a, **k))
    fake_dns["metadata.google.internal"] = "169.254.169.254"
    for policy in (FetchPolicy(), FetchPolicy(allow_loopback=True, allow_private_network=True)):
        with pytest.raises(FetchError) as error:
            resolve("metadata.google.internal", 80, policy)
        assert error.value.reason == "blocked_address" and "--allow-link-local" in str(error.value)
    assert asked == []
    assert resolve("metadata.google.internal", 80, FetchPolicy(allow_link_local=True)) == "169.254.169.254"
    assert asked == ["metadata.google.internal"]


def test_a_name_resolving_into_a_closed_scope_is_refused_with_the_option(fake_dns: dict[str, str]) -> None:
    fake_dns.update({"internal.test": "10.1.2.3", "metadata.test": "169.254.169.254"})
    with pytest.raises(FetchError) as error:
        resolve("internal.test", 80, FetchPolicy(allow_loopback=True))
    assert str(error.value) == ("internal.test resolves to 10.1.2.3, a private-network address: "
                                "refused unless --allow-private-network")
    with pytest.raises(FetchError) as error:
        resolve("metadata.test", 80, FetchPolicy(allow_private_network=True))
    assert str(error.value) == ("metadata.test resolves to 169.254.169.254, the cloud metadata service's address: "
                                "refused unless --allow-link-local")


def test_allow_loopback_alone_fetches_from_a_loopback_server_and_nothing_else(
        tmp_path: Path, server: ImageServer, requests_seen: list[str], fake_dns: dict[str, str]) -> None:
    port = server.httpd.server_address[1]
    serve(server, "/a.jpg", Response(jpeg(4)))
    fake_dns.update({"internal.test": "10.1.2.3", "metadata.test": "169.254.169.254"})
    urls = [f"http://127.0.0.1:{port}/a.jpg", f"http://internal.test:{port}/b.jpg",
            f"http://metadata.test:{port}/c.jpg", f"http://metadata.google.internal:{port}/d.jpg"]
    rows = [row(url, f"case {i}") for i, url in enumerate(urls)]
    result = run_rows(tmp_path, rows, allow_private_network=False, allow_loopback=True, timeout=1.0)
    assert outcomes(result, rows) == {0: "kept", 1: "blocked_address", 2: "blocked_address", 3: "blocked_address"}
    assert requests_seen == [*ORIGIN_FILES, "/a.jpg"]  # the refused hosts were asked for no robots.txt either


def test_a_refused_fetch_says_which_option_would_allow_it(server: ImageServer, requests_seen: list[str]) -> None:
    url = serve(server, "/a.jpg", Response(jpeg(5)))
    with pytest.raises(FetchError) as error:
        fetch(url, FetchPolicy(timeout=1.0, allow_link_local=True))
    assert error.value.reason == "blocked_address" and "refused unless --allow-loopback" in str(error.value)
    assert requests_seen == []
    assert fetch(url, FetchPolicy(timeout=1.0, allow_loopback=True)) == jpeg(5)


def host_spellings(port: int) -> list[str]:
    """127.0.0.1 written every way a URL parser or resolver accepts it."""
    hosts = ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "0177.1", "127.1", "[::1]",
             "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "0"]
    return [f"http://{host}:{port}/a.jpg" for host in hosts]


@pytest.fixture
def public_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A server on 127.0.0.2 that the address check treats as public: the one row meant to survive."""
    handler = type("Public", (_Handler,), {"routes": {"/ok.jpg": Response(jpeg(9))}})
    httpd = ThreadingHTTPServer(("127.0.0.2", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    real = fetch_module._blocked
    monkeypatch.setattr(fetch_module, "_blocked", lambda address: address != "127.0.0.2" and real(address))
    yield f"http://127.0.0.2:{httpd.server_address[1]}/ok.jpg"
    httpd.shutdown()
    httpd.server_close()


def test_a_corpus_pointing_at_loopback_is_blocked_and_the_server_sees_nothing(
        tmp_path: Path, server: ImageServer, requests_seen: list[str], fake_dns: dict[str, str],
        public_server: str) -> None:
    port = server.httpd.server_address[1]
    serve(server, "/a.jpg", Response(jpeg(1)))
    fake_dns.update({"internal.test": "10.1.2.3", "metadata.test": "169.254.169.254", "rebind.test": "127.0.0.1"})
    urls = host_spellings(port) + [f"http://{name}:{port}/a.jpg" for name in ("internal.test", "metadata.test",
                                                                              "rebind.test")]
    rows = [row(url, f"case {i}") for i, url in enumerate(urls)] + [row(public_server, "public")]
    result = run_rows(tmp_path, rows, allow_private_network=False, timeout=1.0)
    got = outcomes(result, rows)
    assert got.pop(len(urls)) == "kept"
    wrong = {urls[i]: reason for i, reason in got.items() if reason != "blocked_address"}
    assert not wrong, f"{len(urls) - len(wrong)} of {len(urls)} blocked; not blocked: {wrong}"
    assert requests_seen == []
    with_flag = run_rows(tmp_path / "allowed", rows[:1], allow_private_network=True)
    assert with_flag["stats"]["kept"] == 1 and requests_seen == [*ORIGIN_FILES, "/a.jpg"]  # the flag lifts the check


def test_a_redirect_hop_is_checked_again(server: ImageServer, requests_seen: list[str],
                                         loopback_is_public: None) -> None:
    """127.0.0.1 plays a public host here; its redirect to 127.0.0.2 (loopback) must not be followed."""
    port = server.httpd.server_address[1]
    start = serve(server, "/start", Response(status=302, headers={"Location": f"http://127.0.0.2:{port}/a.jpg"}))
    serve(server, "/a.jpg", Response(jpeg(2)))
    with pytest.raises(FetchError) as error:
        fetch(start, FetchPolicy(timeout=1.0))
    assert error.value.reason == "blocked_address" and "127.0.0.2" in str(error.value)
    assert requests_seen == ["/start"]
    relative = serve(server, "/relative", Response(status=307, headers={"Location": "/a.jpg"}))
    assert fetch(relative, FetchPolicy(timeout=1.0)) == jpeg(2)


def test_dns_is_asked_once_per_hop_and_the_checked_address_is_used(
        server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebinding resolver answers a public address first, then loopback: the connection goes where was checked."""
    real, asked = socket.getaddrinfo, []
    serve(server, "/a.jpg", Response(jpeg(3)))

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return real("127.0.0.1" if len(asked) == 1 else "10.9.9.9", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{server.httpd.server_address[1]}/a.jpg"
    assert fetch(url, FetchPolicy(timeout=1.0, allow_private_network=True)) == jpeg(3)
    assert asked == ["rebind.test"]


def test_a_slow_resolver_is_bounded_by_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: time.sleep(5) if host == "slow.test"
                        else real(host, *a, **k))
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetch("http://slow.test/a.jpg", FetchPolicy(timeout=0.5))
    assert error.value.reason == "timeout" and time.monotonic() - started < 1.5
