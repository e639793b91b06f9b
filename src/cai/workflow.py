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


def check_finetune_plan(config: dict[str, Any], training: bool) -> None:
    """Check the fine-tuning settings before anything runs: the split fractions
    always, and, when the DAG trains (``training``), that the configured data set
    leaves enough galaxies in each split."""
    from cai.split import check_fractions, check_split_sizes, split_counts

    settings = config["finetune"]
    fractions = check_fractions(settings["split"])
    if not training:
        return
    counts = split_counts(dataset_rows(config), fractions)
    try:
        check_split_sizes(counts, fractions, settings["min_validation"])
    except ConfigError as err:
        raise ConfigError(
            f"finetune (a data set of {sum(counts.values()):,} galaxies): {err}"
        ) from None


BACKEND_KINDS = ("local", "slurm", "lambda")
# Keys of inference (and cluster.gpus) that a backend entry may override.
BACKEND_OVERRIDES = ("device", "threads", "partitions_per_job", "max_jobs", "gpus")


def backend_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    """Settings of backend ``name``: its entry of ``backends`` over the defaults of
    ``inference`` (device, threads, partitions_per_job, max_jobs) and ``cluster.gpus``.
    """
    backends = config["backends"]
    if name not in backends:
        raise ConfigError(
            f"backend {name!r} is not configured; config `backends` has "
            f"{', '.join(sorted(backends))}: add an entry or pick one of those"
        )
    entry = backends[name]
    settings = {key: config["inference"][key] for key in BACKEND_OVERRIDES[:-1]}
    settings["gpus"] = config["cluster"]["gpus"]
    settings.update({k: v for k, v in entry.items() if k in BACKEND_OVERRIDES})
    settings["kind"] = entry["kind"]
    settings["name"] = name
    if settings["kind"] != "slurm" and settings["gpus"]:
        settings["gpus"] = 0
    return settings


def run_plan(
    config: dict[str, Any],
    size_mb: float | None = None,
    data_gb: float | None = None,
    backend: str | None = None,
) -> Plan:
    """The plan of a run at partition size ``size_mb`` over ``data_gb`` GiB (None: the
    stored data once) on ``backend`` (its partitions_per_job and max_jobs); each
    defaults to the configured run's."""
    size_mb = config["partition"]["size_mb"] if size_mb is None else size_mb
    physical = partition_total({**config, "partition": {"size_mb": size_mb}})
    settings = backend_settings(config, backend or config["inference"]["backend"])
    try:
        return make_plan(
            physical,
            size_mb,
            data_gb,
            settings["partitions_per_job"],
            settings["max_jobs"],
        )
    except ValueError as err:
        raise ConfigError(f"data size / backend {settings['name']}: {err}") from None


def check_backend_placement(kind: str, backend: str) -> None:
    """Refuse to label a run with a SLURM backend when it does not run in SLURM: its
    times would be filed under the wrong backend in every comparison."""
    if kind == "slurm" and not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError(
            f"backend {backend!r} is a SLURM backend but this job is not running in a "
            "SLURM job (no SLURM_JOB_ID): run snakemake with --profile profiles/slurm "
            "(or profiles/slurm-gpu)"
        )


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
