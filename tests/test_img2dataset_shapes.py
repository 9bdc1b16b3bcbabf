"""Every shape a real img2dataset output folder comes in is input: a shard whose downloads all failed (an empty tar),
a shard whose tar is missing or 0 bytes (a crash), `--output_format files` and `--output_format parquet`; and a
folder that mixes downloaded shards with metadata parquet is refused, never half read."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline.run import run_local
from curate.testing.server import ImageServer, Response
from tests.conftest import make_jpeg, tar_samples

ROWS, PER_SHARD = 64, 16
EMPTY_SHARD = 1  # every URL of this shard fails: img2dataset writes a tar with no member
RUN = {"scores": "metadata", "world_size": 2, "workers_per_rank": 1, "min_size": 200, "image_size": 512,
       "dedup": ["url", "exact", "phash"]}
FORMATS = ("webdataset", "files", "parquet")
SCRIPT = """
import json, sys
from img2dataset import download
job = json.loads(sys.argv[1])
for output_format, (folder, url_list) in job["outputs"].items():
    download(url_list=url_list, input_format="parquet", url_col="URL", caption_col="TEXT",
             save_additional_columns=["WIDTH", "HEIGHT", "AESTHETIC_SCORE", "pwatermark"], output_format=output_format,
             output_folder=folder, processes_count=1, thread_count=4, number_sample_per_shard=job["per_shard"],
             image_size=400, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=95, timeout=5,
             retries=0, distributor="multiprocessing", enable_wandb=False)
"""


def failing(i: int) -> bool:
    return i // PER_SHARD == EMPTY_SHARD or i % 10 == 7


def img2dataset_outputs(folder: Path) -> dict[str, Path]:
    """The real img2dataset (its Python API, one process) downloads a LAION-style list from 127.0.0.1 in every output
    format: the same images and captions, each format's URLs under its own path (so one run can read all of them
    without url duplicates); shard 1's URLs all fail, and every tenth URL elsewhere."""
    rng = np.random.default_rng(5)
    sizes = [(int(rng.integers(300, 700)), int(rng.integers(300, 700))) for _ in range(ROWS)]
    scores = [(float(rng.uniform(4.5, 7.0)), float(rng.uniform(0, 0.5))) for _ in range(ROWS)]
    outputs = {name: folder / name for name in FORMATS}
    with ImageServer() as server:
        lists = {}
        for name in FORMATS:
            rows = []
            for i, ((width, height), (aesthetic, watermark)) in enumerate(zip(sizes, scores, strict=True)):
                path = f"/{name}/{i}.jpg"
                if not failing(i):
                    server.routes[path] = Response(make_jpeg(width, height, 7000 + i))
                rows.append({"URL": server.url(path), "TEXT": f"a photo of object {i}", "WIDTH": float(width),
                             "HEIGHT": float(height), "AESTHETIC_SCORE": aesthetic, "pwatermark": watermark})
            lists[name] = folder / f"{name}-list.parquet"
            pq.write_table(pa.Table.from_pylist(rows), lists[name])
        job = {"per_shard": PER_SHARD, "outputs": {name: (str(outputs[name]), str(lists[name])) for name in FORMATS}}
        done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(job)], capture_output=True, text=True,
                              timeout=300, env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return outputs


def number(url: str) -> int:
    """The row number i of a served URL (/FORMAT/i.jpg): the same image and caption in every format."""
    return int(url.rsplit("/", 1)[-1].split(".")[0])


def crashed_copy(webdataset: Path, target: Path) -> Path:
    """The webdataset output as after a crash: shard 0's tar gone, shard 2's 0 bytes (their parquet and stats stay)."""
    shutil.copytree(webdataset, target)
    (target / "00000.tar").unlink()
    (target / "00002.tar").write_bytes(b"")
    return target


def caption_field_tar(path: Path) -> Path:
    """KEY.jpg + KEY.json {"text", AESTHETIC_SCORE, pwatermark}, no .txt: a caption only --caption-field text finds."""
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            meta = {"text": f"a hand made sample number {i}", "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1}
            for name, payload in ((f"t{i}.jpg", make_jpeg(320 + 8 * i, 300, 9100 + i)),
                                  (f"t{i}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    return tar_samples(sorted((out / "shards").glob("*.tar")))


def downloaded_images(outputs: dict[str, Path]) -> dict[int, bytes]:
    """Row number -> the image bytes img2dataset stored (from its files output)."""
    images = {}
    for document in outputs["files"].glob("*/*.json"):
        meta = json.loads(document.read_text())
        images[number(meta["url"])] = document.with_suffix(".jpg").read_bytes()
    return images


def ingest_meta(out: Path) -> dict[str, Any]:
    return json.loads((out / "stages" / "ingest" / "_SUCCESS").read_text())


def expected_failures() -> int:
    return sum(failing(i) for i in range(ROWS))


def test_a_shard_whose_downloads_all_failed_is_an_empty_tar_and_valid_input(img2dataset_shapes, tmp_path,
                                                                            config_factory):
    outputs = img2dataset_shapes
    empty = outputs["webdataset"] / f"{EMPTY_SHARD:05d}.tar"
    with tarfile.open(empty) as tar:
        assert tar.getmembers() == []  # what img2dataset really writes: the end-of-archive blocks only
    stats = run_local([str(outputs["webdataset"])], tmp_path / "out", config_factory(**RUN))
    assert stats["input_rows"] == ROWS == stats["kept"] + stats["dropped"]
    assert stats["dropped_by_stage"]["ingest"] == {"img2dataset_failed_to_download": expected_failures()}
    assert stats["kept"] == len(shard_samples(tmp_path / "out")) > 0
    assert ingest_meta(tmp_path / "out")["damaged_inputs"] == []


def test_a_missing_or_empty_tar_is_a_damaged_input_with_every_row_in_the_ledger(img2dataset_shapes, tmp_path,
                                                                               config_factory):
    outputs = img2dataset_shapes
    folder = crashed_copy(outputs["webdataset"], tmp_path / "crashed")
    out = tmp_path / "out"
    stats = run_local([str(folder)], out, config_factory(**RUN))
    assert stats["input_rows"] == ROWS == stats["kept"] + stats["dropped"]
    lost = sum(not failing(i) for i in range(ROWS) if i // PER_SHARD in (0, 2))
    assert stats["dropped_by_stage"]["ingest"] == {"img2dataset_failed_to_download": expected_failures(),
                                                   "img2dataset_shard_missing": lost}
    damaged = ingest_meta(out)["damaged_inputs"]
    assert sorted(Path(d["file"]).name for d in damaged) == ["00000.tar", "00002.tar"]
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    missing = [r for r in ledger if r["reason"] == "img2dataset_shard_missing"]
    assert {r["url"] for r in missing} and all("not in the shard" in r["detail"] for r in missing)
    assert stats["kept"] == len(shard_samples(out)) > 0  # shard 3's samples


@pytest.mark.parametrize("output_format", ["files", "parquet"])
def test_files_and_parquet_outputs_are_read_as_the_webdataset_one(img2dataset_shapes, tmp_path, config_factory,
                                                                 output_format):
    outputs, config = img2dataset_shapes, config_factory(**RUN)
    baseline = run_local([str(outputs["webdataset"])], tmp_path / "wds", config)
    stats = run_local([str(outputs[output_format])], tmp_path / "out", config)
    assert stats["input_rows"] == ROWS == stats["kept"] + stats["dropped"]
    assert stats["dropped_by_stage"] == baseline["dropped_by_stage"]
    assert ingest_meta(tmp_path / "out")["input_format"] == "webdataset"  # stored images: nothing fetched
    images, wds = downloaded_images(outputs), tar_samples(sorted(outputs["webdataset"].glob("*.tar")))
    kept = shard_samples(tmp_path / "out")
    assert len(kept) == stats["kept"] == baseline["kept"] > 0
    by_number = {number(json.loads(s["json"])["url"]): s for s in wds.values()}
    assert len(by_number) == len(wds) == len(images)
    for sample in kept.values():
        i = number(json.loads(sample["json"])["url"])
        assert sample["jpg"] == images[i] == by_number[i]["jpg"]  # img2dataset's bytes, as from its tars
        assert sample["txt"] == by_number[i]["txt"]


def test_caption_field_names_the_json_caption_and_is_not_kept_twice(tmp_path, config_factory):
    tar = caption_field_tar(tmp_path / "text-000.tar")
    out = tmp_path / "out"
    stats = run_local([str(tar)], out, config_factory(**{**RUN, "caption_field": "text", "world_size": 2}))
    assert stats["input_rows"] == 6 == stats["kept"] + stats["dropped"] and stats["kept"] >= 2
    for sample in shard_samples(out).values():
        document = json.loads(sample["json"])
        assert sample["txt"].decode().startswith("a hand made sample number")
        assert "text" not in document["metadata"] and "source_text" not in document["metadata"]
    names = pq.read_schema(out / "samples.parquet").names
    assert "text" not in names and "source_text" not in names


def test_a_folder_of_tars_and_metadata_parquet_is_refused_naming_the_parquet(img2dataset_shapes, tmp_path,
                                                                             config_factory):
    outputs = img2dataset_shapes
    mixed = tmp_path / "mix"
    mixed.mkdir()
    shutil.copy(outputs["webdataset"] / "00003.tar", mixed / "a-000.tar")
    shutil.copy(outputs["webdataset"].parent / "files-list.parquet", mixed / "meta.parquet")
    config = config_factory(**RUN)
    for inputs in ([str(mixed)], [str(mixed / "a-000.tar"), str(mixed / "meta.parquet")]):
        with pytest.raises(ValueError, match=r"meta\.parquet.*--input-format webdataset"):
            run_local(inputs, tmp_path / "refused", config)
        assert not (tmp_path / "refused").exists()  # refused before any work
    stats = run_local([str(mixed)], tmp_path / "tars", config_factory(**{**RUN, "input_format": "webdataset"}))
    assert stats["input_rows"] == PER_SHARD - 1 == stats["kept"] + stats["dropped"]  # a-000.tar has no sidecar
    assert [Path(p).name for p in ingest_meta(tmp_path / "tars")["ignored_inputs"]] == ["meta.parquet"]


def test_list_inputs_tells_every_shard_shape_from_metadata(tmp_path):
    from curate.wds.inputs import list_inputs

    shard = {"key": ["0"], "status": ["success"], "error_message": [None], "url": ["http://a/0.jpg"]}
    tarfile.open(tmp_path / "a.tar", "w").close()
    pq.write_table(pa.table(shard), tmp_path / "a.parquet")  # a.tar's sidecar
    pq.write_table(pa.table(shard), tmp_path / "b.parquet")  # its tar is gone
    (tmp_path / "b_stats.json").write_text("{}")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "0.jpg").write_bytes(make_jpeg(8, 8, 1))
    pq.write_table(pa.table(shard), tmp_path / "c.parquet")  # files format
    pq.write_table(pa.table({**shard, "jpg": [make_jpeg(8, 8, 2)]}), tmp_path / "d.parquet")  # parquet format
    pq.write_table(pa.table({"URL": ["http://a/1.jpg"], "TEXT": ["x"]}), tmp_path / "meta.parquet")
    with pytest.raises(ValueError, match=r"meta\.parquet"):
        list_inputs([str(tmp_path)], "auto")
    stored = list_inputs([str(tmp_path)], "webdataset")
    assert stored.stored and [Path(p).name for p in stored.files] == ["a.tar", "b.parquet", "c", "d.parquet"]
    assert [Path(p).name for p in stored.ignored] == ["meta.parquet"]
    metadata = list_inputs([str(tmp_path)], "parquet")  # every parquet, as before; the shards named as ignored
    assert not metadata.stored and [Path(p).name for p in metadata.ignored] == ["a.tar", "c"]
    assert [Path(p).name for p in metadata.files] == ["a.parquet", "b.parquet", "c.parquet", "d.parquet",
                                                      "meta.parquet"]
    (tmp_path / "meta.parquet").unlink()
    assert list_inputs([str(tmp_path)], "auto").files == stored.files
    with pytest.raises(ValueError, match="matches no parquet file"):
        list_inputs([str(tmp_path / "a.tar")], "parquet")
