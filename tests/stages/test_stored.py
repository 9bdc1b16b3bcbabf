"""Stored images (WebDataset input): decoded in slices, image columns built and written without needless copies."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.schema import JPG, TAR_OFFSET, TAR_PATH, TAR_SIZE
from curate.stages.download import DownloadOptions, binary_column, image_bytes_last
from curate.stages.stored import decode_stored, decode_stored_chunks
from curate.storage import files as storage
from tests.conftest import make_jpeg


def located_table(tmp_path, count: int) -> pa.Table:
    """`count` rows whose JPEGs lie in one tar (the last one cut short: its member runs past the end)."""
    path = tmp_path / "in.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            body = make_jpeg(200 + 10 * i, 150, 40 + i)
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    offsets = [m.offset_data for m in members]
    sizes = [m.size for m in members[:-1]] + [members[-1].size + 10**6]
    return pa.table({"row": list(range(count)), TAR_PATH: [str(path)] * count, TAR_OFFSET: offsets, TAR_SIZE: sizes})


def test_binary_column_equals_pa_array() -> None:
    for values in ([b"ab", None, b"", b"xyz"], [], [None], [b"\xff" * 1000] * 5):
        built = binary_column(values)
        built.validate(full=True)
        assert built.equals(pa.array(values, pa.binary()))


def test_slices_add_the_same_columns_as_one_batch(tmp_path) -> None:
    table = located_table(tmp_path, 7)
    options = DownloadOptions(image_size=4096, threads=4)
    whole = decode_stored(table, options)
    pieces = list(decode_stored_chunks(table, options, rows=3))
    assert [p.num_rows for p in pieces] == [3, 3, 1]
    assert pa.concat_tables(pieces).equals(whole)
    assert whole["status"].to_pylist() == ["success"] * 6 + ["truncated"]
    assert whole["drop_reason"].to_pylist()[-1] == "truncated"
    # kept byte for byte, and the download stage measured each stored image for the later stages
    with tarfile.open(tmp_path / "in.tar") as tar:
        assert whole[JPG][0].as_py() == tar.extractfile("0000.jpg").read()
    assert whole["jpg_bytes"].to_pylist() == pc.binary_length(whole[JPG]).to_pylist()
    assert image_bytes_last(whole.drop_columns(["jpg_bytes"])).column_names[-1] == "jpg_bytes"


def test_an_empty_part_still_gets_one_slice_with_the_columns(tmp_path) -> None:
    table = located_table(tmp_path, 2).slice(0, 0)
    pieces = list(decode_stored_chunks(table, DownloadOptions(image_size=4096)))
    assert len(pieces) == 1 and pieces[0].num_rows == 0 and JPG in pieces[0].column_names


def test_image_column_is_stored_plain_in_small_row_groups(tmp_path) -> None:
    images = [bytes([i]) * (3 << 20) for i in range(20)]  # 60 MiB
    table = pa.table({"row": list(range(20)), JPG: images, "caption": ["a caption"] * 20})
    storage.write_table(table, tmp_path / "part.parquet")
    meta = pq.ParquetFile(tmp_path / "part.parquet").metadata
    assert pq.read_table(tmp_path / "part.parquet").equals(table)
    assert 2 < meta.num_row_groups < 20  # ~16 MiB each: a reader after one row does not read them all
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(3)}
    assert columns[JPG].compression == "UNCOMPRESSED" and columns[JPG].statistics is None
    assert columns["caption"].compression == "SNAPPY" and columns["row"].statistics is not None


def test_a_crop_another_tool_made_without_recording_it_is_unknown(tmp_path) -> None:
    """img2dataset's center_crop stores 1100x520 photos square and records no crop: the crop is null, never 0."""
    table = located_table(tmp_path, 4).slice(0, 3)  # images of 200x150, 210x150, 220x150
    claimed = pa.array([400.0, 2000.0, 220.0])  # 4:3 as stored (a keep_ratio resize); 2000x150 cropped; the same
    table = table.append_column("source_original_width", claimed).append_column(
        "source_original_height", pa.array([300.0, 150.0, 150.0]))
    out = decode_stored(table, DownloadOptions(image_size=128, resize_mode="center_crop"))
    assert out["original_width"].to_pylist() == [400, 2000, 220]
    assert out["crop_top"].to_pylist() == [0, None, 0]
    assert out["crop_left"].to_pylist() == [(171 - 128) // 2, None, (188 - 128) // 2]  # 200x150 -> 171x128
