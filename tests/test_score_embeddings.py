"""score-embeddings: aesthetic scores and punsafe from a LAION-style .npy of embeddings, with or without metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.models import AestheticPredictor, SafetyDetector
from curate.models.testing import tiny_safety, write_tiny_aesthetic, write_tiny_safety
from curate.tools.score_embeddings import score_embeddings


@pytest.fixture(scope="module")
def safety(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny NSFW detector in the release's format, 768 wide like the L/14 embeddings."""
    path = tmp_path_factory.mktemp("safety") / "clip_autokeras_binary_nsfw.zip"
    return str(write_tiny_safety(path, tiny_safety(input_dim=768, categorical=(5, 700))))


@pytest.fixture()
def laion_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    embeddings = np.random.default_rng(0).standard_normal((10, 768)).astype(np.float16)
    np.save(tmp_path / "img_emb_0000.npy", embeddings)
    metadata = pa.table({"URL": [f"http://x/{i}.jpg" for i in range(10)], "AESTHETIC_SCORE": [1.0] * 10,
                         "punsafe": [0.5] * 10})
    pq.write_table(metadata, tmp_path / "metadata_0000.parquet", row_group_size=3)
    return tmp_path / "img_emb_0000.npy", tmp_path / "metadata_0000.parquet", write_tiny_aesthetic(tmp_path / "h.pth")


def test_scores_follow_metadata_rows(tmp_path: Path, laion_pair: tuple[Path, Path, Path], safety: str) -> None:
    embeddings, metadata, head = laion_pair
    count = score_embeddings(embeddings, tmp_path / "out" / "scores.parquet", metadata, str(head), chunk_rows=4,
                             safety_weights=safety)
    out = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert count == 10 and out.column_names == ["URL", "aesthetic_score", "punsafe"]  # the metadata's punsafe replaced
    expected = AestheticPredictor.load(head).predict(np.load(embeddings))
    np.testing.assert_allclose(out["aesthetic_score"].to_numpy(), expected, rtol=1e-6)
    unsafe = SafetyDetector.load(safety).predict(np.load(embeddings))
    np.testing.assert_allclose(out["punsafe"].to_numpy(), unsafe, atol=1e-7)
    assert out.schema.field("punsafe").type == pa.float32() and np.ptp(unsafe) > 1e-3
    assert out["URL"].to_pylist() == [f"http://x/{i}.jpg" for i in range(10)]


def test_without_metadata_rows_are_numbered(tmp_path: Path, laion_pair: tuple[Path, Path, Path], safety: str) -> None:
    embeddings, _, head = laion_pair
    score_embeddings(embeddings, tmp_path / "scores.parquet", aesthetic_weights=str(head), chunk_rows=3,
                     safety_weights=safety)
    out = pq.read_table(tmp_path / "scores.parquet")
    assert out["row"].to_pylist() == list(range(10)) and out["aesthetic_score"].null_count == 0
    assert out["punsafe"].null_count == 0


def test_empty_embeddings_still_write_both_columns(tmp_path: Path, laion_pair: tuple[Path, Path, Path],
                                                   safety: str) -> None:
    _, _, head = laion_pair
    np.save(tmp_path / "empty.npy", np.zeros((0, 768), np.float16))
    score_embeddings(tmp_path / "empty.npy", tmp_path / "e.parquet", aesthetic_weights=str(head), safety_weights=safety)
    assert pq.read_table(tmp_path / "e.parquet").column_names == ["row", "aesthetic_score", "punsafe"]


def test_row_count_mismatch_names_both_files(tmp_path: Path, laion_pair: tuple[Path, Path, Path]) -> None:
    _, metadata, head = laion_pair
    np.save(tmp_path / "short.npy", np.zeros((4, 768), np.float16))
    with pytest.raises(ValueError, match="short.npy"):
        score_embeddings(tmp_path / "short.npy", tmp_path / "s.parquet", metadata, str(head))
    assert not (tmp_path / "s.parquet").exists()


def test_command_line(tmp_path: Path, laion_pair: tuple[Path, Path, Path], safety: str) -> None:
    from typer.testing import CliRunner

    from curate.cli import app

    embeddings, metadata, head = laion_pair
    output = ["--output", str(tmp_path / "s.parquet")]
    arguments = [str(embeddings), str(metadata), *output, "--aesthetic-weights", str(head), "--safety-weights", safety]
    result = CliRunner().invoke(app, ["score-embeddings", *arguments])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 10
    absent = str(tmp_path / "absent.pth")
    missing = CliRunner().invoke(app, ["score-embeddings", str(embeddings), *output, "--aesthetic-weights", absent])
    assert missing.exit_code == 2 and "--aesthetic-weights" in missing.output
    no_safety = ["--aesthetic-weights", str(head), "--safety-weights", absent]
    missing = CliRunner().invoke(app, ["score-embeddings", str(embeddings), *output, *no_safety])
    assert missing.exit_code == 2 and "--safety-weights" in missing.output
