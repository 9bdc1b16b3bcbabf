"""Stages: plain functions over Arrow tables, with no engine, filesystem or Spark inside."""
