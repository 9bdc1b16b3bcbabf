"""The shard stage's direct tar header is byte for byte the one tarfile writes."""

from __future__ import annotations

import io
import random
import tarfile

from curate.stages import shard


def test_direct_header_matches_tarfile() -> None:
    rng = random.Random(0)
    names = [f"{rng.getrandbits(64):016x}.{ext}" for ext in ("jpg", "txt", "json") for _ in range(50)] + ["a" * 100]
    sizes = [0, 1, 511, 512, 513, 8**11 - 1] + [rng.randrange(0, 5_000_000) for _ in range(20)]
    for name in names:
        for size in rng.sample(sizes, 6):
            assert shard._header(name, size) == shard._tarfile_header(name, size), (name, size)


def test_members_read_back_with_tarfile() -> None:
    data = shard.sample_bytes("0123456789abcdef", b"\xff\xd8jpeg", "a caption", {"k": 1})
    with tarfile.open(fileobj=io.BytesIO(data + shard.tar_end(len(data)))) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["0123456789abcdef.jpg", "0123456789abcdef.txt", "0123456789abcdef.json"]
        assert tar.extractfile(members[1]).read() == b"a caption"  # type: ignore[union-attr]
        assert all(m.mode == 0o444 and m.mtime == 0 for m in members)
