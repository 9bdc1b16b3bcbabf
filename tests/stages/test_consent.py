"""Consent before download, against a real server on 127.0.0.1: robots.txt (RFC 9309), TDMRep, X-Robots-Tag noml."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.net.fetch import FetchPolicy
from curate.net.origins import MAX_BYTES
from curate.pipeline.run import run_local
from curate.stages.download import DownloadOptions, download
from curate.testing.server import ImageServer, Response
from tests.conftest import make_jpeg, small_config

ROBOTS = """
User-agent: *
Disallow: /private/
Allow: /private/open/
Disallow: /*.png$

User-agent: GPTBot
Disallow: /ai/
"""


def options(**changes: Any) -> DownloadOptions:
    policy = FetchPolicy(timeout=2.0, allow_loopback=True)
    base = DownloadOptions(image_size=64, threads=4, policy=policy, robots_agents=("GPTBot",))
    policy_changes = {k: changes.pop(k) for k in list(changes) if k in {f.name for f in dataclasses.fields(policy)}}
    return dataclasses.replace(base, policy=dataclasses.replace(policy, **policy_changes), **changes)


def fetch_paths(server: ImageServer, paths: list[str], **changes: Any) -> list[dict[str, Any]]:
    for seed, path in enumerate(paths):
        server.routes.setdefault(path, Response(make_jpeg(40, 40, seed)))
    table = pa.table({"url": [server.url(p) for p in paths]})
    got = download(table, options(**changes))
    return got.select(["url", "status", "drop_reason", "consent_robots", "consent_tdm", "consent_headers"]).to_pylist()


def statuses(rows: list[dict[str, Any]]) -> list[str]:
    return [row["status"] for row in rows]


def test_robots_allows_disallows_by_wildcard_and_longest_match_and_ai_tokens(server: ImageServer) -> None:
    server.serve_robots(ROBOTS)
    paths = ["/a.jpg", "/private/b.jpg", "/private/open/c.jpg", "/d.png", "/e.png?size=2", "/ai/f.jpg"]
    got = fetch_paths(server, paths)
    assert statuses(got) == ["success", "robots_disallowed", "success", "robots_disallowed", "success",
                             "robots_disallowed"]
    assert [row["consent_robots"] for row in got] == ["allowed", "disallowed", "allowed", "disallowed", "allowed",
                                                      "disallowed"]
    assert "/private/b.jpg" not in server.requests and "/d.png" not in server.requests  # never asked for
    assert server.requests.count("/robots.txt") == 1  # once for the origin, six URLs and four threads
    # Without GPTBot among the honoured tokens, only the run's own token's group (here `*`) applies.
    assert statuses(fetch_paths(server, ["/ai/f.jpg"], robots_agents=()))[0] == "success"


def test_a_4xx_robots_allows_everything_a_5xx_or_a_timeout_disallows_everything(server: ImageServer) -> None:
    got = fetch_paths(server, ["/a.jpg", "/private/b.jpg"])  # no robots.txt: the server answers 404
    assert statuses(got) == ["success", "success"] and {row["consent_robots"] for row in got} == {"no_robots"}
    server.routes["/robots.txt"] = Response(b"gone", status=410)
    assert statuses(fetch_paths(server, ["/a.jpg"])) == ["success"]
    server.routes["/robots.txt"] = Response(b"busy", status=500)
    got = fetch_paths(server, ["/a.jpg"])
    assert statuses(got) == ["robots_disallowed"] and got[0]["consent_robots"] == "unreachable"
    server.routes["/robots.txt"] = Response(b"User-agent: *\nAllow: /\n", delay=3.0)
    got = fetch_paths(server, ["/a.jpg"], timeout=0.5)
    assert statuses(got) == ["robots_disallowed"] and got[0]["consent_robots"] == "unreachable"
    assert server.requests.count("/a.jpg") == 2  # the two allowed runs only


def test_a_huge_robots_txt_is_read_to_500_kib_not_refused(server: ImageServer) -> None:
    filler = "# " + "x" * 98 + "\n"
    padding = filler * (MAX_BYTES // len(filler) + 10)
    server.serve_robots("User-agent: *\nDisallow: /private/\n" + padding + "Disallow: /late/\n")
    got = fetch_paths(server, ["/private/a.jpg", "/late/b.jpg", "/c.jpg"], max_bytes=100_000)
    # The rule inside the first 500 KiB holds; the one past the cut is never read; the image cap does not apply.
    assert statuses(got) == ["robots_disallowed", "success", "success"]


def test_a_robots_redirect_to_a_private_address_is_refused_without_connecting(server: ImageServer) -> None:
    """10.0.0.1 is never connected to: the address check refuses the hop (--allow-loopback opens loopback only)."""
    server.routes["/robots.txt"] = Response(status=302, headers={"Location": "http://10.0.0.1/robots.txt"})
    got = fetch_paths(server, ["/a.jpg"])
    assert statuses(got) == ["robots_disallowed"] and got[0]["consent_robots"] == "unreachable"
    assert server.requests == ["/robots.txt"]  # neither the image nor tdmrep.json was asked for


def test_tdm_reservation_header_and_tdmrep_json(server: ImageServer) -> None:
    server.serve_tdmrep([{"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://x/policy.json"},
                         {"location": "/", "tdm-reservation": 0}])
    server.routes["/header.jpg"] = Response(make_jpeg(40, 40, 9), headers={"Content-Type": "image/jpeg",
                                                                            "tdm-reservation": "1"})
    got = fetch_paths(server, ["/reserved/a.jpg", "/open/b.jpg", "/header.jpg"])
    assert statuses(got) == ["tdm_reserved", "success", "tdm_reserved"]
    assert [row["consent_tdm"] for row in got] == ["reserved", "not_reserved", "not_reserved"]
    assert [row["consent_headers"] for row in got] == ["not_checked", "allowed", "tdm_reserved"]
    assert "/reserved/a.jpg" not in server.requests
    assert statuses(fetch_paths(server, ["/reserved/a.jpg", "/header.jpg"], respect_tdm=False,
                                honour_tdm_header=False)) == ["success", "success"]


def test_noml_opts_out_by_default(server: ImageServer) -> None:
    server.routes["/noml.jpg"] = Response(make_jpeg(40, 40, 3), headers={"X-Robots-Tag": "noml"})
    assert statuses(fetch_paths(server, ["/noml.jpg"], disallowed_directives=small_config().
                                disallowed_header_directives)) == ["opted_out"]
    assert "noml" in FetchPolicy().disallowed_directives


def test_no_checks_when_turned_off(server: ImageServer) -> None:
    server.serve_robots("User-agent: *\nDisallow: /\n")
    got = fetch_paths(server, ["/a.jpg"], respect_robots=False, respect_tdm=False)
    assert statuses(got) == ["success"] and got[0]["consent_robots"] == got[0]["consent_tdm"] == "not_checked"
    assert "/robots.txt" not in server.requests


def _corpus(tmp_path: Path, server: ImageServer, n: int) -> Path:
    rows = []
    for i in range(n):
        server.routes[f"/img/{i}.jpg"] = Response(make_jpeg(300, 300, 500 + i))
        rows.append({"URL": server.url(f"/img/{i}.jpg"), "TEXT": f"caption {i}", "AESTHETIC_SCORE": 6.0,
                     "pwatermark": 0.1, "WIDTH": 300.0, "HEIGHT": 300.0})
    rows.append({"URL": server.url("/private/x.jpg"), "TEXT": "private", "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1,
                 "WIDTH": 300.0, "HEIGHT": 300.0})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    return tmp_path / "in.parquet"


def test_a_resumed_run_fetches_no_robots_txt_twice_and_records_consent(tmp_path: Path, server: ImageServer) -> None:
    server.serve_robots(ROBOTS)
    source, out = _corpus(tmp_path, server, 8), tmp_path / "out"
    config = small_config(world_size=2, workers_per_rank=1, batch_size_rows=3, processes=1, dedup=["url"])
    first = run_local([str(source)], out, config)
    assert server.requests.count("/robots.txt") == 1
    assert first["dropped_by_stage"]["download"] == {"robots_disallowed": 1}
    assert list((out / "stages" / "download").glob("origins-*.parquet"))
    (out / "stages" / "download" / "part-000001.parquet").unlink()  # as if killed before that part was written
    (out / "stages" / "download" / "_SUCCESS").unlink(missing_ok=True)
    asked = server.requests.count("/img/3.jpg")
    second = run_local([str(source)], out, config)
    assert server.requests.count("/img/3.jpg") == asked + 1  # the part was downloaded again ...
    assert server.requests.count("/robots.txt") == 1  # ... with the robots.txt the first attempt fetched
    assert second["kept"] == first["kept"]
    samples = pq.read_table(out / "samples.parquet")
    assert set(samples["consent_robots"].to_pylist()) == {"allowed"}
    assert set(samples["consent_tdm"].to_pylist()) == {"no_tdmrep"}
    assert set(samples["consent_headers"].to_pylist()) == {"allowed"}
    shard = next((out / "shards").glob("*.tar"))
    import tarfile

    with tarfile.open(shard) as tar:
        document = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))))
    assert document["consent"] == {"robots": "allowed", "tdm": "no_tdmrep", "headers": "allowed"}
    report = (out / "report.html").read_text()
    assert 'id="consent"' in report and "robots_disallowed" in report


@pytest.mark.parametrize("text", ["User-agent: *\nDisallow: /\n", "User-agent: img2dataset\nDisallow: /img/\n"])
def test_robots_for_everyone_or_for_the_run_token_excludes(server: ImageServer, text: str) -> None:
    server.serve_robots(text)
    assert statuses(fetch_paths(server, ["/img/a.jpg"])) == ["robots_disallowed"]


def test_the_origin_cache_is_bounded_and_hands_over_what_it_fetched() -> None:
    from curate.net.origins import READ, OriginCache, OriginFile

    cache, asked = OriginCache(max_kept=2, track=True), []

    def fetcher(origin: str) -> Any:
        return lambda: asked.append(origin) or OriginFile(origin, "robots", READ, "")

    for origin in ("http://a:80", "http://b:80", "http://a:80", "http://c:80", "http://a:80", "http://b:80"):
        cache.get(origin, "robots", fetcher(origin))
    assert asked == ["http://a:80", "http://b:80", "http://c:80", "http://b:80"]  # b was evicted by c; a kept (used)
    assert [found.origin for found in cache.learned()] == asked and cache.learned() == []
