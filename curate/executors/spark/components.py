"""Connected components over DataFrames: min-label propagation with pointer jumping, no pair ever on the driver.

Every node starts with the smallest id among itself and its neighbours; each round a node takes the smallest label
of its neighbours, then the label of its label (pointer jumping, so a chain of length L settles in about log L
rounds). Labels only fall and stay inside the component, so at the fixed point each node holds its component's
smallest id: the same naming as `dedup.hash_components`. Each round is a few joins and one count (the driver learns
how many labels changed); labels are written to scratch and read back every round, which cuts the lineage.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
MAX_ROUNDS = 64  # pointer jumping halves a chain each round: 64 rounds settle any graph of 2^64 nodes


def connected_components(spark: SparkSession, edges: DataFrame, scratch: str) -> DataFrame:
    """(node, component) of every node named in edges (columns left, right; long ids), component its smallest id."""
    from pyspark.sql import functions as F

    both = edges.select(F.col("left").alias("node"), F.col("right").alias("other")).union(
        edges.select(F.col("right").alias("node"), F.col("left").alias("other")))
    both = _stored(spark, both, f"{scratch}/edges")
    labels = _stored(spark, both.groupBy("node").agg(F.least(F.min("other"), F.first("node")).alias("label")),
                     f"{scratch}/labels-0")
    for round_ in range(1, MAX_ROUNDS + 1):
        offered = both.join(labels.withColumnRenamed("node", "other"), "other").groupBy("node").agg(
            F.min("label").alias("offered"))
        lowered = labels.join(offered, "node").select("node", F.least("label", "offered").alias("label"))
        parent = lowered.select(F.col("node").alias("label"), F.col("label").alias("grand"))
        jumped = lowered.join(parent, "label", "left").select(
            "node", F.least("label", F.coalesce("grand", "label")).alias("label"))
        jumped = _stored(spark, jumped, f"{scratch}/labels-{round_}")
        changed = jumped.join(labels.withColumnRenamed("label", "before"), "node").filter(
            F.col("label") != F.col("before")).count()
        labels = jumped
        log.debug("connected components: round %d, %d labels changed", round_, changed)
        if changed == 0:
            return labels.withColumnRenamed("label", "component")
    raise RuntimeError(f"connected components did not settle in {MAX_ROUNDS} rounds")


def _stored(spark: SparkSession, df: DataFrame, path: str) -> DataFrame:
    """df written as parquet and read back: the next round starts from files, not from the whole lineage."""
    df.write.mode("overwrite").parquet(path)
    return spark.read.parquet(path)
