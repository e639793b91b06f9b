"""Glue between the Snakemake workflow and the package.

The Snakefile asks this module how many partitions and inference jobs a configuration
makes (so the whole plan is known before anything runs, and `--dry-run` shows every
job), and each `scripts/*.py` file runs its step through :func:`run_step`, which sends
the log to the rule's `log:` file with a prefix naming the job.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from cai.errors import ConfigError
from cai.partition import (
    PartitionRef,
    partition_count,
    planned_partitions,
    read_manifest,
    rows_per_partition,
)
from cai.plan import Plan, make_plan

_logger = logging.getLogger("cai.workflow")


def coerce_cli_values(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Turn strings that stand for numbers, booleans or null into them, in place.

    Snakemake reads nested `--config key='{a: 1}'` values as strings only; where the
    schema expects another type and the string reads as one (YAML), it is converted,
    so the schema then checks real values.
    """
    expected = {
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "null": type(None),
    }
    for key, sub in schema.get("properties", {}).items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, dict):
            coerce_cli_values(value, sub)
            continue
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        wanted = tuple(expected[t] for t in types if t in expected)
        if isinstance(value, str) and wanted and "string" not in types:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, wanted) and not (
                isinstance(parsed, bool) and "boolean" not in types
            ):
                config[key] = parsed


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


def run_plan(config: dict[str, Any], size_mb: float | None = None) -> Plan:
    """The plan of the configured run (at partition size ``size_mb``, default config's)."""
    size_mb = config["partition"]["size_mb"] if size_mb is None else size_mb
    physical = partition_total({**config, "partition": {"size_mb": size_mb}})
    inference = config["inference"]
    try:
        return make_plan(
            physical,
            size_mb,
            config["data"]["size_gb"],
            inference["partitions_per_job"],
            inference["max_jobs"],
        )
    except ValueError as err:
        raise ConfigError(f"data.size_gb / inference: {err}") from None


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a SLURM time limit, scancel, a cancelled run): unwind, so that atomic
    writes remove their temporaries before the process ends."""
    _logger.error(
        "received SIGTERM (time limit or cancellation): stopping, no output kept"
    )
    raise SystemExit(128 + signum)


def run_step(snakemake: Any, step: Callable[[], Any]) -> Any:
    """Run one workflow step with logging to the rule's log file; log failures too."""
    from cai.logs import setup_logging

    wildcards = ",".join(f"{k}={v}" for k, v in snakemake.wildcards.items())
    prefix = snakemake.rule + (f" {wildcards}" if wildcards else "")
    setup_logging(snakemake.log[0] if snakemake.log else None, prefix=prefix)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
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


def job_partitions(
    manifest: str, indices: list[int], logical: int, physical: int
) -> list[PartitionRef]:
    """The partitions one inference job predicts, checked against the plan."""
    entries = read_manifest(manifest)
    if len(entries["partitions"]) != physical:
        raise ConfigError(
            f"{manifest}: lists {len(entries['partitions'])} partitions but the plan was "
            f"made for {physical}; the data set changed since planning: rerun snakemake"
        )
    return planned_partitions(entries, indices, logical)


def job_output_files(paths: Sequence[str], suffix: str) -> list[str]:
    """The jobs' output files: ``paths`` themselves, or the ``job-*<suffix>`` files of
    the one folder given (the Lambda backend fetches all its results into one)."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return sorted(str(p) for p in Path(paths[0]).glob(f"job-*{suffix}"))
    return list(paths)
