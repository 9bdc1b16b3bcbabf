"""Hostile URLs and servers: every row ends kept or in the ledger with the right reason, none stalls the run."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from curate.fetch import FetchError, FetchPolicy, fetch, is_disallowed
from curate.server import ImageServer, Response
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
    assert time.monotonic() - started < 20
    assert result["stats"]["dropped_by_stage"]["download"]["opted_out"] == 3  # opt-outs are counted


def test_trickle_is_cut_at_the_overall_deadline(server: ImageServer) -> None:
    url = serve(server, "/slow", Response(b"x" * 100, trickle=0.1))
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetch(url, FetchPolicy(timeout=0.5, allow_private_network=True))
    assert error.value.reason == "timeout"
    assert time.monotonic() - started < 1.5


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


@pytest.mark.parametrize(("headers", "disallowed"), [
    (["noai"], True), (["NoIndex"], True), (["noai, max-image-preview:large"], True),
    (["max-image-preview:large, noai"], True), (["img2dataset: noai"], True), (["otherbot: noai"], False),
    (["otherbot: noindex", "noimageai"], True), (["max-image-preview:large"], False), (["all"], False),
    (["otherbot: noai, img2dataset: noindex"], True), ([], False),
])
def test_x_robots_tag(headers: list[str], disallowed: bool) -> None:
    directives = ("noai", "noimageai", "noindex", "noimageindex")
    assert is_disallowed(headers, "img2dataset", directives) is disallowed
