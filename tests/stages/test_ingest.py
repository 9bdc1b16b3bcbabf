import mmh3
import pyarrow as pa
import pytest

from curate.stages.ingest import canonical_names, format_key, key_of, normalize
from curate.stages.prefilter import prefilter


def test_key_is_laion_hash_as_unsigned_hex():
    url, text = "https://example.com/cat.jpg", "a cat"
    signed = mmh3.hash64(url + text)[0]
    assert key_of(url, text) == f"{signed % (1 << 64):016x}"
    assert key_of(None, None) == format_key(mmh3.hash64("")[0])
    assert format_key(-1) == "ffffffffffffffff" and format_key(1) == "0000000000000001"


def test_known_mmh3_value():
    # mmh3.hash64("foo")[0] is -2129773440516405919 (mmh3 documentation example).
    assert mmh3.hash64("foo")[0] == -2129773440516405919
    assert key_of("fo", "o") == format_key(-2129773440516405919)


def test_laion_spellings_normalized():
    table = pa.table({"URL": ["http://a/x.jpg"], "TEXT": ["x"], "WIDTH": [640], "HEIGHT": ["480"],
                      "AESTHETIC_SCORE": [5.5], "pwatermark": [0.1], "LICENSE": ["cc"], "SAMPLE_ID": [7]})
    out = normalize(table, first_row=10)
    assert out.column_names[:4] == ["key", "row", "url", "caption"]
    assert {"width", "height", "aesthetic", "pwatermark", "license", "sample_id"} <= set(out.column_names)
    assert out["height"].to_pylist() == [480.0] and out["width"].type == pa.float64()
    assert out["row"].to_pylist() == [10]


def test_hash_column_is_the_key_when_present():
    table = pa.table({"url": ["http://a/x.jpg", "http://b"], "caption": ["x", "y"], "hash": [-5, None]})
    out = normalize(table, 0)
    assert out["key"].to_pylist() == [format_key(-5), key_of("http://b", "y")]


def test_no_url_column_names_the_columns_found():
    with pytest.raises(ValueError, match=r"no URL column.*\['TEXT', 'WIDTH'\]"):
        canonical_names(["TEXT", "WIDTH"])


def test_two_spellings_of_one_column_are_refused():
    with pytest.raises(ValueError, match="both mean 'caption'"):
        canonical_names(["url", "TEXT", "caption"])


def test_binary_and_dictionary_text_columns_become_strings():
    table = pa.table({"URL": pa.array([b"http://a/1.jpg", b"http://a/\xff.jpg"], pa.binary()),
                      "TEXT": pa.array(["one", "two"]).dictionary_encode()})
    out = normalize(table, 0)
    assert out["url"].type == pa.string() and out["caption"].type == pa.string()
    assert out["url"].to_pylist() == ["http://a/1.jpg", "http://a/\u00ff.jpg"]  # no UTF-8: read as Windows-1252
    assert out["key"][0].as_py() == key_of("http://a/1.jpg", "one")


def test_captions_that_are_no_utf8_are_decoded_by_the_fallback_and_said_so():
    """A binary caption b"caf\xe9 cr\xe8me" became "caf\ufffd cr\ufffdme" and was kept as if nothing happened."""
    captions = [b"caf\xe9 cr\xe8me", "naïve".encode(), b"\x93quoted\x94 \x80 5", b"\xff\xd8\xff\xe0\x00\x10JFIF", None,
                b"lone \xed\xa0\x80 surrogate"]
    table = pa.table({"URL": [f"http://a/{i}.jpg" for i in range(6)], "TEXT": pa.array(captions, pa.binary())})
    out = normalize(table, 0)
    assert out["caption"].to_pylist() == ["café crème", "naïve", "\u201cquoted\u201d \u20ac 5",
                                          "\u00ff\u00d8\u00ff\u00e0\x00\x10JFIF", None,
                                          "lone \ufffd\ufffd\ufffd surrogate"]
    assert out["caption_repair"].to_pylist() == ["cp1252", None, "cp1252", "undecodable", None, "replaced"]
    judged = prefilter(out, None, 0, None, None, None)
    assert judged["drop_reason"].to_pylist() == [None, None, None, "undecodable_caption", "empty_caption", None]
    assert judged["drop_detail"][3].as_py().startswith("not text: \\xff\\xd8\\xff\\xe0\\x00")


def test_an_all_null_column_gets_a_real_type():
    out = normalize(pa.table({"URL": ["http://a/1.jpg"], "TEXT": ["one"], "extra": pa.nulls(1)}), 0)
    assert out["extra"].type == pa.string() and out["extra"].to_pylist() == [None]
