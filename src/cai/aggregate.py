"""Gather the inference jobs' outputs into one catalogue, a partition table and a run summary.

Every predictions file is checked against its metrics record (checksum and row count)
and every partition of the manifest must appear exactly once, so a catalogue is never
built from a partial or mismatched set of results.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cai import __version__
from cai.atomic import atomic_path, sha256_file, write_json
from cai.errors import DataFormatError
from cai.formats import INPUT_BITS_PER_GALAXY
from cai.partition import planned_partitions, read_manifest

_logger = logging.getLogger(__name__)

PARTITION_COLUMNS = [
    "partition",
    "source_partition",
    "rows",
    "backend",
    "host",
    "device",
    "threads",
    "batch_size",
    "precision",
    "fetch_s",
    "model_load_s",
    "read_s",
    "compute_s",
    "write_s",
    "inference_s",
    "wall_s",
    "samples_per_s",
    "bits_per_s",
    "peak_rss_mb",
    "started_at",
    "ended_at",
    "weights",
]


def _load_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(metrics, dict) or not {"job", "partitions"} <= metrics.keys():
        raise DataFormatError(
            f"{path}: not an inference metrics record; expected keys 'job' and "
            "'partitions' as 'cai infer' writes them"
        )
    return metrics


def aggregate(
    predictions: Sequence[str | os.PathLike],
    metrics: Sequence[str | os.PathLike],
    manifest_path: str | os.PathLike,
    catalogue_out: str | os.PathLike,
    partitions_out: str | os.PathLike,
    summary_out: str | os.PathLike,
    logical: int | None = None,
) -> dict[str, Any]:
    """Check and join the jobs' outputs; write catalogue, partition table and summary.

    ``logical`` is the plan's partition count when it differs from the manifest's
    (a data size beyond the stored data, see :mod:`cai.plan`).
    """
    started = time.perf_counter()
    if len(predictions) != len(metrics):
        raise ValueError(
            f"{len(predictions)} predictions files but {len(metrics)} metrics files"
        )
    manifest = read_manifest(manifest_path)
    planned = planned_partitions(manifest, logical=logical)
    expected = {p.id: p.rows for p in planned}
    jobs, records, tables = [], [], []
    for pred_path, metrics_path in zip(
        map(Path, predictions), map(Path, metrics), strict=True
    ):
        job_metrics = _load_metrics(metrics_path)
        job = job_metrics["job"]
        actual = sha256_file(pred_path)
        if actual != job["predictions_sha256"]:
            raise DataFormatError(
                f"{pred_path}: sha256 {actual} differs from {metrics_path}'s record "
                f"{job['predictions_sha256']}; rerun that inference job"
            )
        table = pq.read_table(pred_path)
        if table.num_rows != job["rows"]:
            raise DataFormatError(
                f"{pred_path}: {table.num_rows} rows; {metrics_path} records {job['rows']}"
            )
        jobs.append(job)
        records.extend(job_metrics["partitions"])
        tables.append(table)
    seen: dict[str, int] = {}
    for record in records:
        part = record["partition"]
        if part in seen:
            raise DataFormatError(
                f"partition {part} was predicted by more than one job"
            )
        if part not in expected:
            raise DataFormatError(
                f"partition {part} is not in the manifest {manifest_path}"
            )
        if record["rows"] != expected[part]:
            raise DataFormatError(
                f"partition {part}: {record['rows']} rows predicted, the manifest "
                f"lists {expected[part]}"
            )
        seen[part] = record["rows"]
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise DataFormatError(
            f"{len(missing)} planned partitions over {manifest_path} have no "
            "predictions: " + ", ".join(missing[:10])
        )

    catalogue = pa.concat_tables(tables)
    with atomic_path(catalogue_out) as tmp:
        pq.write_table(catalogue, tmp)
    table = pd.DataFrame.from_records(records)[PARTITION_COLUMNS]
    with atomic_path(partitions_out) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")

    rows = int(table["rows"].sum())
    # A job records when its process started (interpreter and imports count) and, on
    # SLURM, when it was submitted (its queue wait counts as well).
    submitted = [j["submitted_at"] for j in jobs if j.get("submitted_at")]
    processes = [j["process_started_at"] for j in jobs if j.get("process_started_at")]
    first_start = min([j["started_at"] for j in jobs] + submitted + processes)
    last_end = max(j["ended_at"] for j in jobs)
    end_to_end_s = last_end - first_start
    total_bits = rows * INPUT_BITS_PER_GALAXY
    wall = table["wall_s"].to_numpy()
    shared = len(planned) > len(manifest["partitions"])
    summary = {
        "tool": f"cai {__version__}",
        "backend": jobs[0]["backend"],
        "weights": jobs[0]["weights"],
        "batch_size": jobs[0]["batch_size"],
        "precision": jobs[0].get("precision", "fp32"),
        "device": jobs[0]["device"],
        "partition_size_mb": manifest["partition_size_mb"],
        "partitions": len(table),
        "physical_partitions": len(manifest["partitions"]),
        "storage_shared": shared,
        "storage_note": (
            "partitions beyond the stored data reread the stored partition files "
            "cyclically: every galaxy is read and predicted, storage is shared"
            if shared
            else "every partition is its own file"
        ),
        "jobs": len(jobs),
        "rows": rows,
        "input_bits": total_bits,
        "end_to_end_s": end_to_end_s,
        "end_to_end_definition": (
            "first inference job submission (SLURM) or process start to last "
            "inference job end"
        ),
        "throughput_samples_per_s": rows / end_to_end_s,
        "throughput_bits_per_s": total_bits / end_to_end_s,
        "throughput_definition": "all galaxies (image + magnitude bits) over end_to_end_s",
        "sum_of_partition_samples_per_s": float(table["samples_per_s"].sum()),
        "sum_of_partition_bits_per_s": float(table["bits_per_s"].sum()),
        "sum_of_partition_definition": (
            "sum over partitions of each one's rate over its own inference time (the "
            "paper's aggregate); exceeds the real throughput when partitions do not all "
            "run at once"
        ),
        "partition_seconds": {
            "mean": float(wall.mean()),
            "p50": float(np.percentile(wall, 50)),
            "p95": float(np.percentile(wall, 95)),
            "max": float(wall.max()),
        },
        "compute_s": float(table["compute_s"].sum()),
        "threads": int(max(j["threads"] for j in jobs)),
        "job_seconds": float(sum(j["ended_at"] - j["started_at"] for j in jobs)),
        "peak_rss_mb": float(table["peak_rss_mb"].max()),
    }
    write_json(summary_out, summary)
    _logger.info(
        "aggregate: %d jobs, %d partitions, %d galaxies in %.1f s end to end "
        "(%.1f galaxies/s, %.3g bit/s; sum of partition rates %.3g bit/s), "
        "checked in %.1f s -> %s",
        len(jobs),
        len(table),
        rows,
        end_to_end_s,
        summary["throughput_samples_per_s"],
        summary["throughput_bits_per_s"],
        summary["sum_of_partition_bits_per_s"],
        time.perf_counter() - started,
        catalogue_out,
    )
    return summary


def predictions_label(summary: dict[str, Any]) -> str:
    """What made a run's predictions, for tables and plots: the weights, and the
    precision when it is not the faithful fp32."""
    precision = summary.get("precision", "fp32")
    weights = summary["weights"]
    return weights if precision == "fp32" else f"{weights}, {precision}"


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A run summary written by :func:`aggregate`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{path}: not a readable run summary ({err})") from None
