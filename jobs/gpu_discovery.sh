#!/usr/bin/env bash
# Spark's GPU discovery script (spark.executor.resource.gpu.discoveryScript, spark.worker.resource.gpu.discoveryScript):
# prints this node's GPUs as {"name": "gpu", "addresses": ["0", "1", ...]} from nvidia-smi; an empty list when the
# node has none (no nvidia-smi, or it finds no device).
addresses=""
if command -v nvidia-smi >/dev/null 2>&1; then
  addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -E '^[0-9]+$' \
    | sed 's/.*/"&"/' | paste -sd, -)
fi
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
