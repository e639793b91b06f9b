"""Glue between the Snakemake workflow and the package.

The Snakefile asks this module how many partitions and inference jobs a configuration
makes (so the whole plan is known before anything runs, and `--dry-run` shows every
job), and each `scripts/*.py` file runs its step through :func:`run_step`, which sends
the log to the rule's `log:` file with a prefix naming the job.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from cai.errors import ConfigError
from cai.partition import partition_count, rows_per_partition

_logger = logging.getLogger("cai.workflow")


def dataset_rows(config: dict[str, Any]) -> int:
    """Galaxies in the configured data set (the .pt files are memory-mapped to count)."""
    data = config["data"]
    if data["source"] == "synthetic":
        return int(data["synthetic"]["n_galaxies"])
    if not data["pt_files"]:
        raise ConfigError(
            "data.source is 'pt' but data.pt_files is empty; list the .pt files"
        )
    from cai.importpt import count_rows

    return count_rows(data["pt_files"])


def partition_total(config: dict[str, Any]) -> int:
    """Number of partitions of the configured data set at the configured size."""
    size_mb = config["partition"]["size_mb"]
    try:
        rows_per_partition(size_mb)
    except ValueError as err:
        raise ConfigError(f"partition.size_mb: {err}") from None
    return partition_count(dataset_rows(config), size_mb)


def job_count(partitions: int, per_job: int) -> int:
    """Inference jobs for ``partitions`` partitions at ``per_job`` partitions a job."""
    return math.ceil(partitions / per_job)


def job_partition_indices(job: int, per_job: int, partitions: int) -> range:
    """Partition indices handled by inference job ``job``."""
    if not 0 <= job < job_count(partitions, per_job):
        raise ValueError(f"job {job} out of range for {partitions} partitions")
    return range(job * per_job, min((job + 1) * per_job, partitions))


def run_step(snakemake: Any, step: Callable[[], Any]) -> Any:
    """Run one workflow step with logging to the rule's log file; log failures too."""
    from cai.logs import setup_logging

    wildcards = ",".join(f"{k}={v}" for k, v in snakemake.wildcards.items())
    prefix = snakemake.rule + (f" {wildcards}" if wildcards else "")
    setup_logging(snakemake.log[0] if snakemake.log else None, prefix=prefix)
    started = time.perf_counter()
    try:
        result = step()
    except Exception as err:
        _logger.error(
            "failed after %.1f s: %s: %s",
            time.perf_counter() - started,
            type(err).__name__,
            err,
        )
        raise
    _logger.info("done in %.1f s", time.perf_counter() - started)
    return result


def manifest_partitions(manifest: str, indices: list[int]) -> list:
    """The manifest entries at ``indices``, as PartitionRef objects for the engine."""
    from cai.engine import PartitionRef
    from cai.partition import read_manifest

    entries = read_manifest(manifest)["partitions"]
    if indices and max(indices) >= len(entries):
        raise ConfigError(
            f"{manifest}: lists {len(entries)} partitions, but the plan needs index "
            f"{max(indices)}; the data set changed since planning: rerun snakemake"
        )
    return [PartitionRef.from_manifest(entries[i]) for i in indices]
