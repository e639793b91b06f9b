"""The scaling experiment: which runs a sweep makes, and one tidy table of all of them.

An experiment (config section ``experiment``) is a list of sweeps; each sweep is a grid
of backends x data sizes x partition sizes x batch sizes, and every grid point is run
``repeats`` times. The runs of all sweeps (duplicates counted once) are wildcards of one
Snakemake DAG, so ``snakemake experiment`` builds the whole comparison and any run's own
outputs can be built alone.

Each finished run leaves a ``summary.json`` (rule ``aggregate``) and, on Lambda, a
``dispatch.json`` (rule ``dispatch``); :func:`run_row` turns them into one row of the
runs table (columns: :data:`cai.runs_schema.RUN_COLUMNS`), with the run's cost at the
prices of the config.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cai.atomic import atomic_path
from cai.cost import SECONDS_PER_HOUR, Prices, hpc_cost
from cai.errors import ConfigError, DataFormatError
from cai.runs_schema import RUN_COLUMNS

_logger = logging.getLogger(__name__)

# Folder label of a run over the stored data once (data.size_gb null).
DATASET_LABEL = "dataset"


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of an experiment: where, how much, in what pieces, which repeat."""

    backend: str
    data_gb: float | None
    partition_mb: float
    batch_size: int
    repeat: int

    @property
    def data_label(self) -> str:
        return data_label(self.data_gb)

    def path(self) -> str:
        """The run's folder under results/ (the workflow's RUN pattern)."""
        return (
            f"results/{self.backend}/{self.data_label}/"
            f"{self.partition_mb:g}MB-b{self.batch_size}/r{self.repeat}"
        )


def data_label(data_gb: float | None) -> str:
    """Folder label of a data size: 12.6 -> '12.6GB'; None -> 'dataset'."""
    return DATASET_LABEL if data_gb is None else f"{float(data_gb):g}GB"


def parse_data_label(label: str) -> float | None:
    """Inverse of :func:`data_label`."""
    if label == DATASET_LABEL:
        return None
    if not label.endswith("GB"):
        raise ValueError(f"data label {label!r}: expected '<size>GB' or 'dataset'")
    return float(label[:-2])


def experiment_runs(config: Mapping[str, Any]) -> list[RunKey]:
    """Every run of the configured experiment, each once, in the order they run: all
    of the first repeat, then all of the second, ... (so that repeats of one setting
    are apart, and each sweep of the settings starts as cold as the first).

    Raises:
        ConfigError: a sweep names a backend that config ``backends`` lacks.
    """
    experiment = config["experiment"]
    backends = config["backends"]
    runs = set()
    for number, sweep in enumerate(experiment["sweeps"]):
        unknown = sorted(set(sweep["backends"]) - set(backends))
        if unknown:
            raise ConfigError(
                f"experiment.sweeps[{number}] ({sweep['name']}): backends "
                f"{', '.join(unknown)} are not in config `backends` "
                f"({', '.join(sorted(backends))})"
            )
        for backend, data_gb, size, batch, repeat in itertools.product(
            sweep["backends"],
            sweep["data_gb"],
            sweep["partition_mb"],
            sweep["batch_size"],
            range(1, experiment["repeats"] + 1),
        ):
            key = RunKey(backend, float(data_gb), float(size), int(batch), repeat)
            label = key.data_label
            if (
                not re.fullmatch(r"\d+(\.\d+)?GB", label)
                or parse_data_label(label) != key.data_gb
            ):
                raise ConfigError(
                    f"experiment.sweeps[{number}] ({sweep['name']}): data size "
                    f"{data_gb} GB does not survive its folder label "
                    f"{key.data_label!r}; give it with at most 6 significant digits"
                )
            runs.add(key)
    return sorted(runs, key=lambda run: (run.repeat, run))


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{path}: not a readable {what} ({err})") from None


def run_row(
    key: RunKey,
    summary: Mapping[str, Any],
    settings: Mapping[str, Any],
    prices: Prices,
    *,
    experiment: str,
    dispatch: Mapping[str, Any] | None = None,
    memory_mb: float | None = None,
) -> dict[str, Any]:
    """One row of the runs table from a run's summary (and Lambda dispatch summary).

    Args:
        key: The run.
        summary: Its ``summary.json`` (rule aggregate).
        settings: Its backend's settings (:func:`cai.workflow.backend_settings`).
        prices: Unit prices.
        experiment: Experiment name.
        dispatch: Its ``lambda/dispatch.json`` (Lambda runs only).
        memory_mb: Lambda memory size (Lambda runs only).
    """
    kind = settings["kind"]
    parts = summary["partition_seconds"]
    row: dict[str, Any] = {
        "experiment": experiment,
        "run": key.path().removeprefix("results/"),
        "backend": key.backend,
        "kind": kind,
        "device": summary["device"],
        "precision": summary.get("precision", "fp32"),
        "data_gb": math.nan if key.data_gb is None else key.data_gb,
        "galaxies": summary["rows"],
        "partition_mb": key.partition_mb,
        "batch_size": summary["batch_size"],
        "repeat": key.repeat,
        "partitions": summary["partitions"],
        "physical_partitions": summary["physical_partitions"],
        "storage_shared": summary["storage_shared"],
        "invocations": summary["jobs"],
        "threads": summary.get("threads", settings["threads"]),
        "slots": math.nan,
        "memory_mb": math.nan,
        "cold_start_s": math.nan,
        "end_to_end_s": summary["end_to_end_s"],
        "partition_s_mean": parts["mean"],
        "partition_s_p50": parts["p50"],
        "partition_s_p95": parts["p95"],
        "partition_s_max": parts["max"],
        "throughput_sum_bits_per_s": summary["sum_of_partition_bits_per_s"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "core_hours": 0.0,
        "gpu_hours": 0.0,
        "lambda_gb_s": 0.0,
    }
    job_hours = summary.get("job_seconds", math.nan) / SECONDS_PER_HOUR
    if kind == "lambda":
        if dispatch is None:
            raise DataFormatError(
                f"run {row['run']}: a Lambda run needs its lambda/dispatch.json"
            )
        # First invocation sent to last result in: the dispatcher's invoke phase.
        row["end_to_end_s"] = dispatch["dispatch_s"]
        row["invocations"] = dispatch["invocations"]
        row["slots"] = float(dispatch.get("concurrency", math.nan))
        memory_mb = dispatch.get("memory_mb", memory_mb)
        row["memory_mb"] = float(memory_mb) if memory_mb is not None else math.nan
        row["cold_start_s"] = dispatch.get("cold_start_s", math.nan)
        if dispatch.get("skipped"):
            # Only part of the run was invoked this time: its time is no measurement.
            row["end_to_end_s"] = math.nan
            _logger.warning(
                "run %s: %d of %d invocations were reused from an earlier dispatch, so "
                "its end-to-end time and throughput are left empty (NaN) in the table "
                "and the planner ignores it; to measure it, delete its results under "
                "s3://%s/%s/ and its folder %s, then run again",
                row["run"],
                dispatch["skipped"],
                dispatch["invocations"],
                dispatch.get("bucket", "?"),
                dispatch.get("run_prefix", "?"),
                key.path(),
            )
        row["lambda_gb_s"] = dispatch["cost_usd"]["lambda"]["gb_s"]
        row["cost_usd"] = dispatch["cost_usd"]["total"]
        row["cost_basis"] = (
            "Lambda requests, GB-seconds and ephemeral storage from the billed "
            "records, and S3 requests"
            + (
                f"; {dispatch['skipped']} invocations reused from an earlier run"
                if dispatch.get("skipped")
                else ""
            )
        )
    elif kind == "slurm":
        gpus = settings["gpus"]
        row["core_hours"] = row["threads"] * job_hours
        row["gpu_hours"] = gpus * job_hours
        cost = hpc_cost(row["core_hours"], row["gpu_hours"], prices)
        row["cost_usd"] = cost["total_usd"]
        row["cost_basis"] = (
            f"{row['core_hours']:.4g} core-hours at ${prices.hpc_core_hour}/h"
            + (f" + {row['gpu_hours']:.4g} GPU-hours at ${prices.hpc_gpu_hour}/h")
            * bool(gpus)
            + " (inference jobs' wall time x cores and GPUs they held)"
        )
    else:
        row["core_hours"] = row["threads"] * job_hours
        row["cost_usd"] = 0.0
        row["cost_basis"] = "own machine: nothing billed"
    bits = summary["input_bits"]
    row["throughput_wall_bits_per_s"] = bits / row["end_to_end_s"]
    row["throughput_wall_samples_per_s"] = summary["rows"] / row["end_to_end_s"]
    return {name: row[name] for name in RUN_COLUMNS}


def _run_row_checked(path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_row`, with a key missing from a summary named with its file."""
    try:
        return run_row(*args, **kwargs)
    except KeyError as err:
        raise DataFormatError(
            f"{path}: key {err} missing; expected a run summary of rule aggregate "
            "(and a Lambda dispatch summary of rule dispatch)"
        ) from None


def runs_table(
    keys: Sequence[RunKey],
    summaries: Sequence[str | Path],
    dispatches: Mapping[RunKey, str | Path],
    backends: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, Any],
    *,
    experiment: str,
    lambda_memory_mb: float | None,
    csv_out: str | Path,
    parquet_out: str | Path,
) -> pd.DataFrame:
    """Build the runs table from each run's summary; write it as CSV and Parquet.

    ``summaries`` is parallel to ``keys``; ``dispatches`` maps each Lambda run to its
    dispatch summary; ``backends`` maps backend name to its settings.
    """
    started = time.perf_counter()
    if len(keys) != len(summaries):
        raise ValueError(f"{len(keys)} runs but {len(summaries)} summaries")
    price = Prices.from_config(prices)
    rows = []
    for key, path in zip(keys, summaries, strict=True):
        summary = _read_json(path, "run summary")
        dispatch = None
        if key in dispatches:
            dispatch = _read_json(dispatches[key], "Lambda dispatch summary")
        rows.append(
            _run_row_checked(
                path,
                key,
                summary,
                backends[key.backend],
                price,
                experiment=experiment,
                dispatch=dispatch,
                memory_mb=lambda_memory_mb,
            )
        )
    table = pd.DataFrame.from_records(rows, columns=list(RUN_COLUMNS))
    with atomic_path(csv_out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(parquet_out) as tmp:
        table.to_parquet(tmp, index=False)
    _logger.info(
        "runs table: %d runs (%d backends, %d data sizes, %d repeats), %d galaxies "
        "predicted, cost $%.4f in %.1f s -> %s",
        len(table),
        table["backend"].nunique(),
        table["data_gb"].nunique(),
        table["repeat"].nunique(),
        int(table["galaxies"].sum()),
        float(table["cost_usd"].sum()),
        time.perf_counter() - started,
        csv_out,
    )
    return table


def read_runs(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A runs table (Parquet, TSV or CSV by suffix) as :func:`runs_table` writes it;
    ``columns`` (default: all of :data:`RUN_COLUMNS`) must be present."""
    path = Path(path)
    try:
        if path.suffix in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: runs table not found") from None
    except (OSError, ValueError) as err:
        raise DataFormatError(f"{path}: not a readable runs table ({err})") from None
    missing = [c for c in (columns or RUN_COLUMNS) if c not in table.columns]
    if missing:
        raise DataFormatError(
            f"{path}: columns {', '.join(missing)} missing; expected the runs table "
            "of rule experiment_table"
        )
    return table
