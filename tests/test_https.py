"""HTTPS from a TLS server on 127.0.0.1 whose certificate authority the test makes and trusts through --ca-bundle."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from curate.net.fetch import FetchError, FetchPolicy, Session, fetch
from tests.hostile.conftest import jpeg

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def make_authority(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1 and localhost, server key), made with the openssl CLI."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=curate test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "san.ext")
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list[int]]]:
    """(https base URL, CA bundle path, [TLS handshakes done]) of a keep-alive HTTPS server serving /a.jpg."""
    ca, certificate, key = make_authority(tmp_path_factory.mktemp("tls"))
    handshakes = [0]
    body = jpeg(7)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            handshakes[0] += 1

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/a.jpg" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    class TLSServer(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self):  # type: ignore[no-untyped-def]
            connection, address = super().get_request()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate, key)
            return context.wrap_socket(connection, server_side=True), address

    httpd = TLSServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", ca, handshakes
    httpd.shutdown()
    httpd.server_close()


def test_https_with_the_ca_bundle_fetches_and_reuses_one_tls_connection(
        tls_server: tuple[str, Path, list[int]]) -> None:
    base, ca, handshakes = tls_server
    policy = FetchPolicy(timeout=5.0, allow_loopback=True, ca_bundle=str(ca))
    before = handshakes[0]
    with Session() as session:
        assert [fetch(f"{base}/a.jpg", policy, session) for _ in range(3)] == [jpeg(7)] * 3
    assert handshakes[0] - before == 1  # three images, one handshake


def test_https_without_the_ca_bundle_is_refused(tls_server: tuple[str, Path, list[int]]) -> None:
    base, _, _ = tls_server
    with pytest.raises(FetchError) as error:
        fetch(f"{base}/a.jpg", FetchPolicy(timeout=5.0, allow_loopback=True))
    assert error.value.reason == "connection_failed" and "CERTIFICATE_VERIFY_FAILED" in str(error.value)


def test_a_certificate_for_another_name_is_refused(tls_server: tuple[str, Path, list[int]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base, ca, _ = tls_server
    real = socket.getaddrinfo  # img.test: the same server, under a name its certificate does not carry
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1" if host == "img.test" else host,
                                                                          *a, **k))
    policy = FetchPolicy(timeout=5.0, allow_loopback=True, ca_bundle=str(ca))
    with pytest.raises(FetchError) as error:
        fetch(base.replace("127.0.0.1", "img.test") + "/a.jpg", policy)
    assert error.value.reason == "connection_failed" and "Hostname mismatch" in str(error.value)
