"""`curate dedup-embeddings` on memory-mapped float16 .npy files with planted near-duplicates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.tools.dedup_embeddings import OUTPUT_SCHEMA, ConcatenatedVectors, dedup_embeddings

DIM = 96


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _corpus(n: int, pairs: list[tuple[int, int]], seed: int = 0) -> np.ndarray:
    """n random unit vectors where row b of each (a, b) is a near-copy (cosine 0.98) of row a."""
    rng = np.random.default_rng(seed)
    vectors = _unit(rng.standard_normal((n, DIM)))
    for a, b in pairs:
        u = rng.standard_normal(DIM)
        u = _unit(u - (u @ vectors[a]) * vectors[a])
        vectors[b] = 0.98 * vectors[a] + np.sqrt(1 - 0.98**2) * u
    return vectors.astype(np.float16)


def _save(tmp_path: Path, vectors: np.ndarray, splits: list[int]) -> list[str]:
    paths = []
    for i, part in enumerate(np.split(vectors, splits)):
        path = tmp_path / f"img_emb_{i}.npy"
        np.save(path, part)
        paths.append(str(path))
    return paths


def test_files_are_memory_mapped_and_read_as_one_array(tmp_path: Path) -> None:
    vectors = _corpus(50, [])
    concatenated = ConcatenatedVectors(_save(tmp_path, vectors, [20, 35]))
    assert all(isinstance(part, np.memmap) for part in concatenated.parts)
    assert concatenated.shape == (50, DIM)
    np.testing.assert_array_equal(concatenated[15:40], vectors[15:40])
    rows = np.array([0, 19, 20, 21, 34, 35, 49])
    np.testing.assert_array_equal(concatenated[rows], vectors[rows])


def test_duplicates_across_files_keep_the_smallest_index(tmp_path: Path) -> None:
    pairs = [(3, 1500), (700, 2500), (2999, 10), (1200, 1201), (1201, 2000)]  # 1200-1201-2000 chain
    paths = _save(tmp_path, _corpus(3000, pairs), [1000, 2200])
    output = tmp_path / "out" / "dups.parquet"
    dedup_embeddings(paths, str(output), threshold=0.95, clusters=4)
    table = pq.read_table(output)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA.remove_metadata()
    assert table["index"].to_pylist() == list(range(3000))
    flagged = {i: d for i, d in enumerate(table["duplicate_of"].to_pylist()) if d is not None}
    assert flagged == {1500: 3, 2500: 700, 2999: 10, 1201: 1200, 2000: 1200}
    assert table["keep"].to_pylist() == [i not in flagged for i in range(3000)]
    assert set(table["cluster"].to_pylist()) == {0, 1, 2, 3}
    assert [p.name for p in output.parent.iterdir()] == ["dups.parquet"]  # no temporary file left


@pytest.mark.parametrize("names", [("AESTHETIC_SCORE", "WIDTH", "HEIGHT"), ("aesthetic", "width", "height")])
def test_metadata_applies_the_survivor_rule(tmp_path: Path, names: tuple[str, str, str]) -> None:
    n = 400
    paths = _save(tmp_path, _corpus(n, [(5, 6), (5, 7), (100, 101), (200, 201)]), [150])
    aesthetic = np.full(n, 5.0)
    aesthetic[7] = 8.0  # group 5-6-7: row 7 wins on score
    width = np.full(n, 512)
    width[101] = 2048  # group 100-101: equal scores, row 101 is larger
    metadata = tmp_path / "meta.parquet"
    pq.write_table(pa.table({names[0]: aesthetic, names[1]: width, names[2]: np.full(n, 512)}), metadata)
    table = dedup_embeddings(paths, str(tmp_path / "dups.parquet"), metadata=str(metadata))
    flagged = {i: d for i, d in enumerate(table["duplicate_of"].to_pylist()) if d is not None}
    assert flagged == {5: 7, 6: 7, 100: 101, 201: 200}  # 200-201 tie everywhere: smaller index


def test_metadata_without_the_columns_falls_back_to_the_index(tmp_path: Path) -> None:
    paths = _save(tmp_path, _corpus(100, [(9, 4)]), [])
    metadata = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"caption": ["x"] * 100}), metadata)
    table = dedup_embeddings(paths, str(tmp_path / "dups.parquet"), metadata=str(metadata))
    assert {i: d for i, d in enumerate(table["duplicate_of"].to_pylist()) if d is not None} == {9: 4}


def test_bad_inputs_raise_naming_the_option(tmp_path: Path) -> None:
    paths = _save(tmp_path, _corpus(100, []), [])
    metadata = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"WIDTH": [1] * 99}), metadata)
    with pytest.raises(ValueError, match="--metadata"):
        dedup_embeddings(paths, str(tmp_path / "d.parquet"), metadata=str(metadata))
    with pytest.raises(ValueError, match="no file"):
        dedup_embeddings([str(tmp_path / "missing.npy")], str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match="--threshold"):
        dedup_embeddings(paths, str(tmp_path / "d.parquet"), threshold=1.5)
    assert not (tmp_path / "d.parquet").exists()


def test_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from curate.cli import app

    paths = _save(tmp_path, _corpus(200, [(3, 150)]), [100])
    output = tmp_path / "dups.parquet"
    result = CliRunner().invoke(app, ["dedup-embeddings", *paths, "--output", str(output), "--threshold", "0.95"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(output)["duplicate_of"].to_pylist()[150] == 3
    missing = CliRunner().invoke(app, ["dedup-embeddings", str(tmp_path / "none.npy"), "--output", str(output)])
    assert missing.exit_code == 2 and "no file" in missing.output
