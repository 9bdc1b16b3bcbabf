"""A local[2] SparkSession shared by the whole test session (starting a JVM costs tens of seconds on 2 cores)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    pyspark_sql = pytest.importorskip("pyspark.sql")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    session = (pyspark_sql.SparkSession.builder.master("local[2]").appName("curate-tests")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.default.parallelism", "2")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.memory", "1g")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A Spark standalone Master and two 1-core Workers on 127.0.0.1 (tests/executors/standalone.py)."""
    from tests.executors.standalone import SPARK_BIN, Cluster

    assert (SPARK_BIN / "spark-class").exists(), "pyspark installs spark-class next to the interpreter"
    cluster = Cluster(tmp_path_factory.mktemp("standalone"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
