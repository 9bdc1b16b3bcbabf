"""Among duplicates, a copy that passes the select thresholds survives before a better-scored copy that fails them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate.stages.dedup import flag_exact_duplicates, flag_phash_duplicates
from curate.stages.select import select, with_threshold_pass
from curate.stages.semantic import flag_semantic_duplicates
from curate.stages.verdict import alive, with_verdict_columns

THRESHOLDS = {"min_size": 800, "threshold": 5.0, "max_watermark": 0.8, "max_unsafe": None}


def _pair(**second: list) -> pa.Table:
    """Row 'copy' scores 7.0 but fails a threshold; row 'original' scores 6.0 and passes every one."""
    columns = {"key": ["00000000000000aa", "00000000000000bb"], "row": [0, 1],
               "aesthetic_score": [7.0, 6.0], "watermark_prob": [0.1, 0.1],
               "original_width": [600, 1200], "original_height": [450, 900],
               "sha256": ["same", "same"], "phash": [0x0F0F, 0x0F0F | 1]}
    columns.update(second)
    types = {"aesthetic_score": pa.float32(), "watermark_prob": pa.float32(), "original_width": pa.int32(),
             "original_height": pa.int32(), "phash": pa.int64()}
    table = pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()})
    return with_threshold_pass(with_verdict_columns(table), **THRESHOLDS)


def _kept_after_select(table: pa.Table) -> list[str]:
    judged = select(table.drop_columns(["passes_thresholds"]), **THRESHOLDS)
    return judged.filter(alive(judged))["key"].to_pylist()


def test_phash_group_keeps_the_copy_that_passes_the_resolution_rule() -> None:
    judged = flag_phash_duplicates(_pair(), 4)
    assert judged["drop_reason"].to_pylist() == ["duplicate_phash", None]
    assert judged["drop_detail"].to_pylist()[0] == "00000000000000bb"
    assert _kept_after_select(judged) == ["00000000000000bb"]


def test_exact_group_keeps_the_clean_copy_before_the_watermarked_one() -> None:
    table = _pair(original_width=[1600, 1200], original_height=[1200, 900], watermark_prob=[0.95, 0.2])
    judged = flag_exact_duplicates(table)
    assert judged["drop_reason"].to_pylist() == ["duplicate_exact", None]
    assert _kept_after_select(judged) == ["00000000000000bb"]


def test_semantic_group_keeps_the_copy_above_the_aesthetic_threshold() -> None:
    vector = np.random.default_rng(0).normal(size=8).astype(np.float32)
    vector /= np.linalg.norm(vector)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([vector, vector])), 8)
    # The copy is larger and scores higher but under the threshold; the other copy clears it.
    table = _pair(original_width=[2000, 1200], original_height=[1500, 900], aesthetic_score=[4.9, 5.0])
    table = table.append_column("embedding", embedding)
    judged = flag_semantic_duplicates(table, 0.95, 1)
    assert judged["drop_reason"].to_pylist() == ["duplicate_semantic", None]
    assert _kept_after_select(judged) == ["00000000000000bb"]


def test_when_both_copies_pass_the_old_rule_decides() -> None:
    table = _pair(original_width=[1600, 1200], original_height=[1200, 900])
    judged = flag_phash_duplicates(table, 4)
    assert judged["drop_reason"].to_pylist() == [None, "duplicate_phash"]  # 7.0 beats 6.0
