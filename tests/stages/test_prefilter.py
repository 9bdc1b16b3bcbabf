import pyarrow as pa

from curate.stages.ingest import normalize
from curate.stages.prefilter import group_url_duplicates, prefilter, url_problem, url_signature


def _table(rows, first_row=0):
    return normalize(pa.Table.from_pylist(rows), first_row)


def test_url_problems():
    assert url_problem("https://example.com/a.jpg") is None
    for bad in [None, "", "  ", "/relative.jpg", "ftp://x/a.jpg", "javascript:alert(1)", "data:image/png;base64,AA",
                "file:///etc/passwd", "http://user:pass@example.com/a.jpg", "http://" + "a" * 3000, "http://"]:
        assert url_problem(bad) is not None, bad


def test_prefilter_reasons_in_order():
    ok = {"WIDTH": 800.0, "HEIGHT": 600.0, "pwatermark": 0.1, "punsafe": 0.0}
    rows = [
        {"URL": "http://a.com/1.jpg", "TEXT": "ok", **ok},
        {**ok, "URL": "ftp://a.com/2.jpg", "TEXT": "bad scheme", "WIDTH": 10.0, "HEIGHT": 10.0, "pwatermark": 0.9},
        {"URL": "http://a.com/3.jpg", "TEXT": " ", **ok},
        {**ok, "URL": "http://a.com/4.jpg", "TEXT": "small", "HEIGHT": 300.0},
        {**ok, "URL": "http://a.com/5.jpg", "TEXT": "wm", "pwatermark": 0.85},
        {**ok, "URL": "http://a.com/6.jpg", "TEXT": "nsfw", "punsafe": 0.9},
        {"URL": "http://a.com/1.jpg", "TEXT": "ok", **ok},
        {"URL": "http://a.com/7.jpg", "TEXT": "unknown size", "WIDTH": float("nan"), "HEIGHT": None,
         "pwatermark": None, "punsafe": None},
    ]
    table = _table(rows)
    out = prefilter(table, group_url_duplicates(url_signature(table)), min_size=512, max_watermark=0.8, max_unsafe=0.5,
                    aesthetic_threshold=None)
    assert out["drop_reason"].to_pylist() == [None, "invalid_url", "empty_caption", "metadata_low_resolution",
                                              "metadata_watermark", "metadata_unsafe", "duplicate_url", None]
    assert set(out["drop_stage"].drop_null().to_pylist()) == {"prefilter"}
    assert out["drop_detail"][6].as_py() == "0"  # the first occurrence's row number


def test_url_verdicts_group_across_batches_and_detect_collisions():
    first = _table([{"url": "http://a/1", "caption": "x"}], 0)
    second = _table([{"url": "http://a/1", "caption": "x"}, {"url": "http://a/2", "caption": "y"}], 1)
    # Force a key collision: a different url+caption under the first row's key.
    second = second.set_column(0, "key", pa.array([first["key"][0].as_py()] * 2))
    verdicts = group_url_duplicates(pa.concat_tables([url_signature(first), url_signature(second)]))
    assert verdicts.to_pylist() == [
        {"row": 1, "drop_stage": "prefilter", "drop_reason": "duplicate_url", "drop_detail": "0"},
        {"row": 2, "drop_stage": "prefilter", "drop_reason": "key_collision", "drop_detail": "0"}]
    out = prefilter(second, verdicts, 0, None, None, None)
    assert out["drop_reason"].to_pylist() == ["duplicate_url", "key_collision"]
    kept = prefilter(first, verdicts, 0, None, None, None)
    assert kept["drop_reason"].to_pylist() == [None]


def test_the_fast_url_shape_never_clears_a_url_the_full_check_refuses():
    import re

    import numpy as np

    from curate.stages.prefilter import URL_SHAPE, flag_invalid_urls

    pieces = ["http://", "https://", "HTTP://", "ftp://", "http:/", "", "a.com", "[::1]", "[zz]", "user:pw@", "@",
              ":80", ":65535", ":65536", ":", ":99999", "/", "/p?q=1#f", " ", "\t", "\x00", "\x7f", "\xa0", "é",
              "\\", "%20", "[", "]", "//", "?", "#", "-", "."]
    rng = np.random.default_rng(0)
    urls = ["".join(rng.choice(pieces, size=int(rng.integers(1, 6)))) for _ in range(10_000)]
    schemes, hosts = ["http://", "https://", "HtTp://", "http:", "ftp://"], ["a.com", "[::1]", "x", "", "é.com", "a b"]
    ports, rests = ["", ":80", ":65535", ":65536", ":", ":0"], ["", "/", "/a b", "/é", "?q", "#f", "\\x", "/\x7f"]
    urls += ["".join(rng.choice(part)) for part in (schemes, hosts, ports, rests) for _ in range(1)] * 0 + [
        rng.choice(schemes) + rng.choice(hosts) + rng.choice(ports) + rng.choice(rests) for _ in range(10_000)]
    urls += ["http://a.com/" + "x" * 3000, "https://example.com:28413/a.jpg", "http://127.0.0.1/img.jpg"]
    pattern = re.compile(URL_SHAPE)
    cleared = [u for u in urls if pattern.search(u) and len(u) <= 2048]
    assert len(cleared) > 1000
    assert [u for u in cleared if url_problem(u) is not None] == []
    table = normalize(pa.table({"URL": urls, "TEXT": ["c"] * len(urls)}), 0)
    flagged = flag_invalid_urls(table)["drop_detail"].to_pylist()
    assert flagged == [url_problem(u) for u in urls]  # the same verdict and detail as checking every row in Python
