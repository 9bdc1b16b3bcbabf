"""Stage checkpoints: live rows in part-i, the rows a stage dropped in dropped-i (only when it dropped some)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.storage import checkpoint as io


def _alive(table: pa.Table) -> pa.ChunkedArray:
    return pc.is_null(table["drop_reason"])


def test_a_part_that_drops_nothing_has_no_dropped_file_and_a_stale_one_goes(tmp_path: Path) -> None:
    checkpoint = io.Checkpoint(tmp_path, "download")
    table = pa.table({"row": [1, 2, 3], "drop_reason": pa.array([None, None, None], pa.string())})
    for index, write in enumerate([
        lambda i: checkpoint.write_split(i, table, _alive(table)),
        lambda i: checkpoint.write_split_pieces(i, [table.slice(0, 2), table.slice(2)], _alive),
    ]):
        io.write_table(table.slice(0, 1), checkpoint.dropped_path(index))  # left by a killed earlier attempt
        write(index)
        assert not checkpoint.dropped_path(index).exists()
        assert pq.read_table(checkpoint.part_path(index))["row"].to_pylist() == [1, 2, 3]
    assert checkpoint.dropped_parts() == []


def test_dropped_rows_go_to_dropped_whole_or_in_pieces(tmp_path: Path) -> None:
    checkpoint = io.Checkpoint(tmp_path, "download")
    table = pa.table({"row": [1, 2, 3, 4], "drop_reason": pa.array([None, "gone", None, "gone"], pa.string())})
    checkpoint.write_split(0, table, _alive(table))
    checkpoint.write_split_pieces(1, [table.slice(0, 1), table.slice(1, 2), table.slice(3)], _alive)
    for index in (0, 1):
        assert pq.read_table(checkpoint.part_path(index))["row"].to_pylist() == [1, 3]
        assert pq.read_table(checkpoint.dropped_path(index))["row"].to_pylist() == [2, 4]
