"""Hostile URLs and servers: every row ends kept or in the ledger with the right reason, none stalls the run."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from curate.net.fetch import FetchError, FetchPolicy, fetch, is_disallowed, is_transient
from curate.testing.server import ImageServer, Response
from tests.hostile.conftest import TIMEOUT, jpeg, outcomes, row, run_rows, serve

MAX_BYTES = 200_000


def url_cases(server: ImageServer, fake_dns: dict[str, str]) -> list[tuple[str | None, str]]:
    """(url, expected outcome) for every URL case of the issue."""
    port = server.httpd.server_address[1]
    fake_dns["xn--bcher-kva.test"] = "127.0.0.1"  # bücher.test, IDNA-encoded
    ok = serve(server, "/ok.jpg", Response(jpeg(1)))
    serve(server, "/caf%C3%A9.jpg", Response(jpeg(2)))
    serve(server, "/loop-a", Response(status=302, headers={"Location": "/loop-b"}))
    serve(server, "/loop-b", Response(status=302, headers={"Location": "/loop-a"}))
    return [
        ("", "invalid_url"), ("   ", "invalid_url"), (None, "invalid_url"), ("/ok.jpg", "invalid_url"),
        ("ftp://127.0.0.1/a.jpg", "invalid_url"), ("file:///etc/passwd", "invalid_url"),
        ("data:image/png;base64,iVBORw0KGgo=", "invalid_url"), ("javascript:alert(1)", "invalid_url"),
        (ok + "?" + "x" * 10_000, "invalid_url"), (f"http://user:pass@127.0.0.1:{port}/ok.jpg", "invalid_url"),
        (f" {ok}", "invalid_url"), (ok.replace("ok", "o k"), "invalid_url"),
        (ok, "kept"),
        (f"http://bücher.test:{port}/caf%C3%A9.jpg", "kept"),  # IDN host
        (server.url("/café.jpg"), "kept"),  # raw non-ASCII path: sent percent-encoded
        (server.url("/loop-a"), "too_many_redirects"),
        (serve(server, "/to-private", Response(status=302, headers={"Location": f"http://127.0.0.2:{port}/ok.jpg"})),
         "blocked_address"),
        (serve(server, "/to-file", Response(status=301, headers={"Location": "file:///etc/passwd"})), "invalid_url"),
        (serve(server, "/silent", Response(jpeg(3), delay=30)), "timeout"),
        (serve(server, "/trickle", Response(jpeg(4), trickle=0.2)), "timeout"),
        (serve(server, "/empty", Response(b"")), "empty_body"),
        (serve(server, "/huge", Response(b"\xff" * (MAX_BYTES + 1))), "too_large"),
        (serve(server, "/as-text", Response(jpeg(5), headers={"Content-Type": "text/plain"})), "kept"),
        (serve(server, "/html", Response(b"<html><body>x</body></html>")), "decode_failed"),
        (serve(server, "/noai", Response(jpeg(6), headers={"X-Robots-Tag": "noai"})), "opted_out"),
        (serve(server, "/noai-2", Response(jpeg(7), headers={"X-Robots-Tag": "max-image-preview:large, noai"})),
         "opted_out"),
        (serve(server, "/noai-3", Response(jpeg(8), headers={"X-Robots-Tag": "img2dataset: noimageai"})),
         "opted_out"),
        (serve(server, "/other-bot", Response(jpeg(9), headers={"X-Robots-Tag": "otherbot: noai"})), "kept"),
        (serve(server, "/gone", Response(b"no", status=404)), "http_error"),
        (serve(server, "/down", Response(b"no", status=503)), "http_error"),
        (f"http://127.0.0.1:{_closed_port()}/a.jpg", "connection_failed"),
        ("http://does-not-exist.invalid/a.jpg", "dns_failed"),
    ]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_url_case_ends_with_its_reason(tmp_path: Path, server: ImageServer, fake_dns: dict[str, str],
                                             loopback_is_public: None) -> None:
    cases = url_cases(server, fake_dns)
    rows = [row(url, f"case {i}") for i, (url, _) in enumerate(cases)]
    started = time.monotonic()
    result = run_rows(tmp_path, rows, allow_private_network=False, max_image_bytes=MAX_BYTES)
    got = outcomes(result, rows)
    wrong = {i: (cases[i][0] and cases[i][0][:80], expected, got[i])
             for i, (_, expected) in enumerate(cases) if got[i] != expected}
    assert not wrong, f"{len(cases) - len(wrong)} of {len(cases)} right; wrong: {wrong}"
    assert time.monotonic() - started < 60  # no case hangs the run (a wide bound: the machine may be loaded)
    assert result["stats"]["dropped_by_stage"]["download"]["opted_out"] == 3  # opt-outs are counted


def test_trickle_is_cut_at_the_overall_deadline(server: ImageServer) -> None:
    url = serve(server, "/slow", Response(b"x" * 100, trickle=0.1))
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetch(url, FetchPolicy(timeout=0.5, allow_private_network=True))
    assert error.value.reason == "timeout"
    assert time.monotonic() - started < 5  # the trickle would take 10 s; a wide bound for a loaded machine


@pytest.fixture
def endless_server() -> Iterator[tuple[str, list[int]]]:
    """Answers 200 with no Content-Length and streams bytes until the client hangs up; counts what it sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent = [0]

    def serve_one() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n")
            try:
                while sent[0] < 1 << 30:
                    connection.sendall(b"\xff" * 65536)
                    sent[0] += 65536
            except OSError:
                pass

    threading.Thread(target=serve_one, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/big.jpg", sent
    listener.close()


def test_huge_body_is_streamed_and_abandoned_at_the_cap(endless_server: tuple[str, list[int]]) -> None:
    url, sent = endless_server
    with pytest.raises(FetchError) as error:
        fetch(url, FetchPolicy(timeout=TIMEOUT, max_bytes=1 << 20, allow_private_network=True))
    assert error.value.reason == "too_large"
    time.sleep(0.2)
    assert sent[0] < 64 << 20  # the client hung up long before the server ran out of bytes


def _short_body_server(announced: int, body: bytes, then_wait: float) -> tuple[str, socket.socket]:
    """Answers 200 announcing `announced` bytes, sends `body`, then waits `then_wait` s before hanging up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                               + f"Content-Length: {announced}\r\n\r\n".encode() + body)
            time.sleep(then_wait)

    threading.Thread(target=serve_one, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/short.jpg", listener


@pytest.mark.parametrize(("then_wait", "reason"), [(0.0, "connection_failed"), (30.0, "timeout")])
def test_a_body_shorter_than_its_content_length_is_never_an_image(then_wait: float, reason: str) -> None:
    """The server announces 5,000 bytes and sends 1,000 of a real JPEG: hanging up is a failed connection (never a
    truncated image to decode), holding the rest back past the deadline a timeout."""
    url, listener = _short_body_server(5000, jpeg(11)[:1000], then_wait)
    started = time.monotonic()
    with listener, pytest.raises(FetchError) as error:
        fetch(url, FetchPolicy(timeout=2.0, allow_private_network=True))
    assert error.value.reason == reason, error.value
    assert reason != "connection_failed" or "after 1000 of 5000 bytes" in str(error.value)
    assert time.monotonic() - started < 10  # the deadline holds (a wide bound for a loaded machine)


@pytest.mark.parametrize(("headers", "disallowed"), [
    (["noai"], True), (["NoIndex"], True), (["noai, max-image-preview:large"], True),
    (["max-image-preview:large, noai"], True), (["img2dataset: noai"], True), (["otherbot: noai"], False),
    (["otherbot: noindex", "noimageai"], True), (["max-image-preview:large"], False), (["all"], False),
    (["otherbot: noai, img2dataset: noindex"], True), ([], False),
])
def test_x_robots_tag(headers: list[str], disallowed: bool) -> None:
    directives = ("noai", "noimageai", "noindex", "noimageindex")
    assert is_disallowed(headers, "img2dataset", directives) is disallowed


class KeepAliveServer:
    """HTTP/1.1 with keep-alive on 127.0.0.1: counts connections, requests and the most requests in flight at once.

    routes: path -> list of (status, headers, body, delay) answered in turn (the last one repeats)."""

    def __init__(self, routes: dict[str, list[tuple[int, dict[str, str], bytes, float]]]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes, self.connections, self.requests, self.in_flight, self.most = routes, 0, [], 0, 0
        lock, outer = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with lock:
                    outer.connections += 1

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with lock:
                    outer.requests.append(self.path)
                    outer.in_flight += 1
                    outer.most = max(outer.most, outer.in_flight)
                    answers = outer.routes.get(self.path, [(404, {}, b"", 0.0)])
                    status, headers, body, delay = answers.pop(0) if len(answers) > 1 else answers[0]
                time.sleep(delay)
                with lock:
                    outer.in_flight -= 1
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keep_alive() -> Iterator[KeepAliveServer]:
    server = KeepAliveServer({})
    yield server
    server.close()


POLICY = FetchPolicy(timeout=TIMEOUT, allow_private_network=True)


def test_at_most_max_per_host_requests_in_flight(keep_alive: KeepAliveServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from curate.net.fetch import Session

    for i in range(12):
        keep_alive.routes[f"/{i}.jpg"] = [(200, {}, jpeg(i), 0.1)]
    with Session(max_per_host=3) as session, ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(lambda i: fetch(keep_alive.url(f"/{i}.jpg"), POLICY, session), range(12)))
    assert bodies == [jpeg(i) for i in range(12)]
    assert keep_alive.most == 3  # 12 threads, one host: never more than 3 at once, and 3 were used
    assert keep_alive.connections <= 3  # kept alive: one connection per slot, not one per image


def test_a_kept_alive_connection_is_reused_and_never_reaches_a_refused_address(
        keep_alive: KeepAliveServer, fake_dns: dict[str, str]) -> None:
    from curate.net.fetch import Session

    keep_alive.routes["/a.jpg"] = [(200, {}, jpeg(1), 0.0)]
    fake_dns.update({"img.test": "127.0.0.1", "other.test": "127.0.0.1"})
    url, loopback = keep_alive.url("/a.jpg", "img.test"), FetchPolicy(timeout=TIMEOUT, allow_loopback=True)
    with Session() as session:
        assert fetch(url, loopback, session) == fetch(url, loopback, session) == jpeg(1)
        assert keep_alive.connections == 1 and len(keep_alive.requests) == 2  # the second rode the first's socket
        fake_dns["img.test"] = "10.0.0.7"  # DNS now points the name at a private address: refused, socket unused
        with pytest.raises(FetchError) as rebound:
            fetch(url, loopback, session)
        fake_dns["img.test"] = "127.0.0.1"
        with pytest.raises(FetchError) as scoped:  # the same address under a policy that does not open it
            fetch(url, FetchPolicy(timeout=TIMEOUT, allow_link_local=True), session)
        assert fetch(keep_alive.url("/a.jpg", "other.test"), loopback, session) == jpeg(1)
    assert rebound.value.reason == scoped.value.reason == "blocked_address"
    assert len(keep_alive.requests) == 3  # the server saw nothing of the refused fetches
    assert keep_alive.connections == 2  # another name for the same address got a socket of its own


def test_a_connection_the_server_closed_is_replaced(keep_alive: KeepAliveServer) -> None:
    from curate.net.fetch import Session

    keep_alive.routes["/a.jpg"] = [(200, {}, jpeg(2), 0.0)]
    with Session() as session:
        assert fetch(keep_alive.url("/a.jpg"), POLICY, session) == jpeg(2)
        for _, connection in next(iter(session._idle.values())):
            assert connection.sock is not None
            connection.sock.shutdown(socket.SHUT_RDWR)  # as a server's idle timeout would
        assert fetch(keep_alive.url("/a.jpg"), POLICY, session) == jpeg(2)
    assert keep_alive.connections == 2


def test_retry_after_is_honoured_within_the_deadline(keep_alive: KeepAliveServer) -> None:
    keep_alive.routes["/busy.jpg"] = [(503, {"Retry-After": "1"}, b"", 0.0), (200, {}, jpeg(3), 0.0)]
    keep_alive.routes["/later.jpg"] = [(429, {"Retry-After": "3600"}, b"", 0.0), (200, {}, jpeg(4), 0.0)]
    started = time.monotonic()
    assert fetch(keep_alive.url("/busy.jpg"), FetchPolicy(timeout=3.0, allow_private_network=True)) == jpeg(3)
    assert 1.0 <= time.monotonic() - started < 2.5
    started = time.monotonic()
    with pytest.raises(FetchError) as error:  # an hour is past the deadline: no wait, a transient failure
        fetch(keep_alive.url("/later.jpg"), FetchPolicy(timeout=3.0, allow_private_network=True))
    assert error.value.reason == "http_error" and str(error.value).startswith("HTTP 429")
    assert time.monotonic() - started < 2.0 and is_transient(error.value.reason, str(error.value))  # < the deadline


def test_a_host_that_keeps_failing_rests(keep_alive: KeepAliveServer) -> None:
    from curate.net.fetch import FAILURES_BEFORE_BACKOFF, Session

    keep_alive.routes["/down.jpg"] = [(500, {}, b"", 0.0)]
    with Session() as session:
        for _ in range(FAILURES_BEFORE_BACKOFF + 2):
            with pytest.raises(FetchError):
                fetch(keep_alive.url("/down.jpg"), FetchPolicy(timeout=0.5, allow_private_network=True), session)
    # Three failures in a row, then a 1 s rest the 0.5 s deadline cannot wait out: the host is not asked again.
    assert len(keep_alive.requests) == FAILURES_BEFORE_BACKOFF
