"""Spark dedup: exact (sha256) and perceptual (pHash) duplicates as aggregations, semantic as a per-cluster step.

Each kind finds its candidate groups with a Spark aggregation, then runs curate.stages' own flagging function per
group (applyInArrow), so the survivor rule is the local engine's. Only (row, verdict) of flagged rows come back.
pHash components: near pairs come from exploded bands grouped in Spark (groups split further inside, see
curate.stages.hamming); their connected components are DataFrame rounds (spark.components), not a driver
union-find. Semantic: driver-side k-means on a bounded sample, clusters assigned in mapInArrow,
`semantic.dedup_group` per cluster, then the components of its duplicate pairs as DataFrame rounds and the survivor
rule per component (what `semantic.resolve_survivors` does in memory).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.executors.spark.components import connected_components
from curate.executors.spark.frames import (
    INDEX,
    VERDICT_DDL,
    arrow_schema,
    flagged_rows,
    global_index,
    map_stage,
)
from curate.schema import (
    DROP_REASON,
    EMBEDDING,
    KEY,
    PHASH,
    ROW,
    SHA256,
)
from curate.stages import dedup, semantic
from curate.stages.verdict import SURVIVOR_COLUMNS, with_verdict_columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


def _alive_with(df: DataFrame, column: str) -> DataFrame:
    from pyspark.sql import functions as F

    return df.filter(F.col(DROP_REASON).isNull() & F.col(column).isNotNull())


def _groups_of_two_or_more(df: DataFrame, group: str) -> DataFrame:
    from pyspark.sql import functions as F

    repeated = df.groupBy(group).agg(F.count("*").alias("_n")).filter("_n > 1").select(group)
    return df.join(repeated, group)


def _flag_exact_group(table: pa.Table) -> pa.Table:
    return flagged_rows(dedup.flag_exact_duplicates(with_verdict_columns(table)))


def _flag_phash_group(table: pa.Table) -> pa.Table:
    """One connected component of near hashes: every row but the survivor is a duplicate."""
    labels = np.zeros(table.num_rows, dtype=np.int64)
    return flagged_rows(dedup.flag_group_duplicates(with_verdict_columns(table), labels, "duplicate_phash"))


def _flag_semantic_group(table: pa.Table) -> pa.Table:
    """One component of semantic duplicate pairs: every row but the survivor is a duplicate."""
    labels = np.zeros(table.num_rows, dtype=np.int64)
    return flagged_rows(dedup.flag_group_duplicates(with_verdict_columns(table), labels, semantic.REASON))


def exact_flags(df: DataFrame) -> DataFrame:
    """Rows whose downloaded bytes repeat a better row's (dedup.flag_exact_duplicates per sha256 group)."""
    candidates = _alive_with(df, SHA256).select(*SURVIVOR_COLUMNS, SHA256)
    return _groups_of_two_or_more(candidates, SHA256).groupBy(SHA256).applyInArrow(_flag_exact_group, VERDICT_DDL)


def band_pairs(table: pa.Table, max_distance: int) -> pa.Table:
    """(left, right) distinct hash values of one band group within max_distance bits, left < right as uint64."""
    left, right = dedup.band_group_pairs(table, max_distance)
    return pa.table({"left": pa.array(left, pa.int64()), "right": pa.array(right, pa.int64())})


def near_pairs(hashes: DataFrame, max_distance: int) -> DataFrame:
    """(left, right) distinct hash values within the distance, each pair once: bands exploded, grouped by (band,
    value), each group searched by hamming.near_pairs_in_bands (oversized groups split inside it)."""
    from pyspark.sql import functions as F

    bands = [F.struct(F.lit(i).alias("band"), F.shiftrightunsigned(PHASH, lo).bitwiseAND(F.lit((1 << (hi - lo)) - 1))
                      .alias("value")) for i, (lo, hi) in enumerate(dedup.band_slices(max_distance))]
    banded = hashes.select(PHASH, F.explode(F.array(*bands)).alias("b")).select(PHASH, "b.band", "b.value")
    counted = banded.groupBy("band", "value").agg(F.count("*").alias("_n")).filter("_n > 1").drop("_n")
    return banded.join(counted, ["band", "value"]).groupBy("band", "value").applyInArrow(
        lambda table: band_pairs(table, max_distance), "left long, right long")


def phash_flags(spark: SparkSession, df: DataFrame, max_distance: int, scratch: str) -> DataFrame:
    """Rows within max_distance bits of a better row's pHash, chained (dedup.flag_phash_duplicates' components):
    near pairs in bounded band groups, their components as DataFrame rounds (spark.components), never on the driver."""
    from pyspark.sql import functions as F

    candidates = _alive_with(df, PHASH).select(*SURVIVOR_COLUMNS, PHASH)
    labeled = candidates.withColumn("component", F.col(PHASH))  # identical hashes only
    if max_distance:
        edges = near_pairs(candidates.select(PHASH).distinct(), max_distance)
        mapping = connected_components(spark, edges, scratch).withColumnRenamed("node", PHASH)
        labeled = candidates.join(mapping, PHASH, "left").withColumn("component", F.coalesce("component", PHASH))
    groups = _groups_of_two_or_more(labeled, "component")
    return groups.groupBy("component").applyInArrow(_flag_phash_group, VERDICT_DDL)


def fixed_embeddings(table: pa.Table) -> pa.Table:
    """The embedding column back as fixed_size_list (Spark carries it as array<float>), as semantic expects."""
    column = table[EMBEDDING].combine_chunks()
    width = len(column[0]) if len(column) else 1
    fixed = pa.FixedSizeListArray.from_arrays(pc.list_flatten(column).cast(pa.float32()), width)
    return table.set_column(table.column_names.index(EMBEDDING), EMBEDDING, fixed)


def _training_sample(spark: SparkSession, candidates: DataFrame, n: int, k: int, seed: int, path: str) -> np.ndarray:
    """The rows semantic.training_sample picks (by rank in row order), collected: at most k x 256 (and 2M)."""
    size = min(n, k * semantic.TRAIN_POINTS_PER_CLUSTER, semantic.MAX_TRAIN_POINTS)
    indexed = global_index(spark, candidates.select(ROW, EMBEDDING), [ROW], path)
    if size < n:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        indexed = indexed.join(spark.createDataFrame(pa.table({INDEX: pa.array(chosen, pa.int64())})), INDEX)
    table = fixed_embeddings(indexed.orderBy(INDEX).select(EMBEDDING).toArrow())
    return semantic.embedding_matrix(table[EMBEDDING])


def _assign(centroids: np.ndarray) -> Any:
    def run(table: pa.Table) -> pa.Table:
        table = fixed_embeddings(table)
        nearest, second = semantic.assign_clusters(semantic.embedding_matrix(table[EMBEDDING]), centroids)
        visitors = np.flatnonzero(second >= 0)  # boundary rows are searched in their second cluster too
        both = pa.concat_tables([table, table.take(pa.array(visitors, pa.int64()))])
        cluster = np.concatenate([nearest, second[visitors]]).astype(np.int64)
        return both.append_column("cluster", pa.array(cluster))
    return run


def _dedup_cluster(threshold: float, seed: int) -> Any:
    def run(table: pa.Table) -> pa.Table:
        table = fixed_embeddings(table.sort_by(ROW))  # members in row order, as the local engine searches them
        result = semantic.dedup_group(table, threshold, seed)
        return result.filter(pc.not_equal(result[KEY], result["survivor_key"]))
    return run


def semantic_flags(spark: SparkSession, df: DataFrame, threshold: float, clusters: int | None, seed: int,
                   scratch: str) -> DataFrame | None:
    """Rows with CLIP cosine >= threshold to a better row's (semantic.flag_semantic_duplicates' result)."""
    from pyspark.sql import functions as F

    candidates = _alive_with(df, EMBEDDING).select(*SURVIVOR_COLUMNS, EMBEDDING)
    n = candidates.count()
    if n < 2:
        return None
    k = max(1, min(clusters or semantic.default_cluster_count(n), n))
    centroids = (semantic.train_centroids(_training_sample(spark, candidates, n, k, seed, scratch), k, seed)
                 if k > 1 else np.ones((1, 1), np.float32))
    assign = _assign(centroids)
    schema = arrow_schema(candidates).append(pa.field("cluster", pa.int64()))  # embedding stays array<float>
    assigned = map_stage(candidates, assign, schema)
    pairs = assigned.groupBy("cluster").applyInArrow(_dedup_cluster(threshold, seed), "key string, survivor_key string")
    rows = candidates.select(KEY, ROW)
    survivors = rows.select(F.col(KEY).alias("survivor_key"), F.col(ROW).alias("right"))
    edges = pairs.join(rows, KEY).select(F.col(ROW).alias("left"), "survivor_key").join(
        survivors, "survivor_key").select("left", "right")
    if edges.limit(1).count() == 0:
        return None
    # components that boundary rows link across clusters, then one survivor each (semantic.resolve_survivors' rule)
    mapping = connected_components(spark, edges, f"{scratch}-components").withColumnRenamed("node", ROW)
    members = candidates.select(*SURVIVOR_COLUMNS).join(mapping, ROW)
    log.info("semantic dedup: %d rows, %d clusters", n, k)
    return members.groupBy("component").applyInArrow(_flag_semantic_group, VERDICT_DDL)

