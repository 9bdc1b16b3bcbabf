"""score-embeddings: aesthetic scores from a LAION-style .npy of embeddings, with or without its metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.models import AestheticPredictor
from curate.models.testing import write_tiny_aesthetic
from curate.score_embeddings import score_embeddings


@pytest.fixture()
def laion_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    embeddings = np.random.default_rng(0).standard_normal((10, 768)).astype(np.float16)
    np.save(tmp_path / "img_emb_0000.npy", embeddings)
    metadata = pa.table({"URL": [f"http://x/{i}.jpg" for i in range(10)], "AESTHETIC_SCORE": [1.0] * 10})
    pq.write_table(metadata, tmp_path / "metadata_0000.parquet", row_group_size=3)
    return tmp_path / "img_emb_0000.npy", tmp_path / "metadata_0000.parquet", write_tiny_aesthetic(tmp_path / "h.pth")


def test_scores_follow_metadata_rows(tmp_path: Path, laion_pair: tuple[Path, Path, Path]) -> None:
    embeddings, metadata, head = laion_pair
    count = score_embeddings(embeddings, tmp_path / "out" / "scores.parquet", metadata, str(head), chunk_rows=4)
    out = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert count == 10 and out.column_names == ["URL", "aesthetic_score"]
    expected = AestheticPredictor.load(head).predict(np.load(embeddings))
    np.testing.assert_allclose(out["aesthetic_score"].to_numpy(), expected, rtol=1e-6)
    assert out["URL"].to_pylist() == [f"http://x/{i}.jpg" for i in range(10)]


def test_without_metadata_rows_are_numbered(tmp_path: Path, laion_pair: tuple[Path, Path, Path]) -> None:
    embeddings, _, head = laion_pair
    score_embeddings(embeddings, tmp_path / "scores.parquet", aesthetic_weights=str(head), chunk_rows=3)
    out = pq.read_table(tmp_path / "scores.parquet")
    assert out["row"].to_pylist() == list(range(10)) and out["aesthetic_score"].null_count == 0


def test_row_count_mismatch_names_both_files(tmp_path: Path, laion_pair: tuple[Path, Path, Path]) -> None:
    _, metadata, head = laion_pair
    np.save(tmp_path / "short.npy", np.zeros((4, 768), np.float16))
    with pytest.raises(ValueError, match="short.npy"):
        score_embeddings(tmp_path / "short.npy", tmp_path / "s.parquet", metadata, str(head))
    assert not (tmp_path / "s.parquet").exists()


def test_command_line(tmp_path: Path, laion_pair: tuple[Path, Path, Path]) -> None:
    from typer.testing import CliRunner

    from curate.cli import app

    embeddings, metadata, head = laion_pair
    output = ["--output", str(tmp_path / "s.parquet")]
    arguments = [str(embeddings), str(metadata), *output, "--aesthetic-weights", str(head)]
    result = CliRunner().invoke(app, ["score-embeddings", *arguments])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 10
    absent = str(tmp_path / "absent.pth")
    missing = CliRunner().invoke(app, ["score-embeddings", str(embeddings), *output, "--aesthetic-weights", absent])
    assert missing.exit_code == 2 and "--aesthetic-weights" in missing.output
