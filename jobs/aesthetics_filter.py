"""The cluster job: `spark-submit jobs/aesthetics_filter.py --input 's3a://…/*.parquet' --output s3a://… --threshold 5`.

Thin: the options of `curate run` (same names and defaults, `--config` too), a SparkSession, curate's Spark engine.
Also runs as `python jobs/aesthetics_filter.py …` in local mode (`--master`, local[*] when no master is configured).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from curate.config import OPTION_HELP, default_of, load_config, option_fields

log = logging.getLogger("curate.jobs.aesthetics_filter")


def _option_type(field_type: str) -> Any:
    """The argparse type of a Config field, as the `curate run` CLI maps it (lists are comma lists)."""
    if "bool" in field_type:
        return None
    if "list" in field_type or "str" in field_type:
        return str
    if "float" in field_type:
        return float
    return int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Curate LAION-style parquet metadata into WebDataset shards on Spark.")
    parser.add_argument("--input", nargs="+", action="extend", required=True,
                        help="Parquet files, globs or folders (any Hadoop path: s3a://, gs://, hdfs://, file).")
    parser.add_argument("--output", required=True, help="Output folder (any Hadoop/fsspec URL).")
    parser.add_argument("--config", help="TOML file; keys are the long option names.")
    parser.add_argument("--master", help="Spark master, overriding spark-submit's (default: spark-submit's, else "
                        "local[*]).")
    for field in option_fields():
        default = default_of(field)
        shown = ",".join(default) if isinstance(default, list) else default
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{OPTION_HELP[field.name]} [default: {shown}]"
        kind = _option_type(str(field.type))
        if kind is None:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:  # None by default so a --config file's value is not overridden
            parser.add_argument(flag, dest=field.name, type=kind, default=None, help=help_text)
    return parser


def spark_session(master: str | None) -> Any:
    """The session spark-submit configured, or a local one (local[*] unless --master says otherwise)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers run this interpreter when not submitted
    builder = SparkSession.builder.appName("curate-aesthetics-filter")
    if master:
        builder = builder.master(master)
    return builder.getOrCreate()  # no master anywhere: pyspark's launcher defaults to local[*]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    overrides = {field.name: getattr(args, field.name) for field in option_fields()}
    try:
        config = load_config(args.config, overrides)
    except ValueError as error:
        log.error("%s", error)
        return 2
    from curate.executors.spark.engine import run_spark

    spark = spark_session(args.master)
    try:
        stats = run_spark(spark, args.input, args.output, config)
    except ValueError as error:
        log.error("%s", error)
        return 2
    finally:
        spark.stop()
    log.info("%d rows in, %d kept, %d dropped; %d shards x %d samples in %s/shards", stats["input_rows"],
             stats["kept"], stats["dropped"], stats["shards"]["num_shards"], stats["shards"]["samples_per_shard"],
             args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
