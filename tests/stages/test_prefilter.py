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
