"""Predict, before spending anything, how long and how much a data size takes.

The planner turns measured runs (the experiment's runs table, one row per run, columns
of :mod:`cai.runs_schema`) into a small time model per backend and batch size, then
prices every option (backend x partition size x Lambda memory) for the data sizes
asked for, and recommends one within a time or a cost budget.

The model, per backend and batch size (``kind`` and ``device`` of the runs decide how
many partitions run at once):

    partition_s = fixed_s + galaxies_per_partition x galaxy_cpu_s / cpu_share
    time_s      = overhead_s + startup_s + waves x invocation_s
    invocation_s = partitions_per_invocation x partition_s + invocation_start_s
    waves       = ceil(invocations / slots)

- ``partition_s`` is a partition's wall time as measured (fetch, model load, read,
  compute, write). With runs at two or more partition sizes, ``fixed_s`` and the
  per-galaxy rate are fitted by least squares on the runs' ``partition_s_p50`` (the
  median: a job's one model load then counts per job, not per partition; else
  ``partition_s_mean``)
  against galaxies per partition; with one size the model is proportional
  (``fixed_s`` = 0). A measured size uses its own measured seconds; a size not
  measured is predicted from the rate and says so (``extrapolated``).
- ``cpu_share`` is 1 except on Lambda, where CPU is given in proportion to memory:
  one vCPU's worth per ``lambda_vcpu_mb`` MB, at most 6. Assumed: the per-galaxy part
  of a partition's time scales as 1 / min(memory_mb / lambda_vcpu_mb, 6, threads),
  with ``threads`` the CPU threads the measured invocations ran; so memory beyond the
  measured threads buys no speed, and the fixed part (S3 fetch, model load) does not
  scale. Runs at several memory sizes are fitted together on that scale.
- ``slots`` is what runs at once (in calibration, a run's own ``slots`` where the
  table has them): Lambda, ``lambda_concurrency`` invocations (the
  account limit; 2,000 partitions at 1,000 make 2 waves); SLURM CPU and GPU jobs,
  ``slurm_slots`` and ``slurm_gpu_slots``; local jobs, ``local_slots``.
- ``startup_s`` is paid once per run: on Lambda ``lambda_cold_start_s`` (the first wave
  starts new execution environments; later waves reuse them warm; calibration takes
  out each measured run's own cold start, column ``cold_start_s``, instead), on SLURM
  ``slurm_scheduler_wait_s`` (queue wait before the first jobs start), else 0.
- ``invocation_start_s`` is what each wave adds beyond its partitions' own seconds:
  a job's process start and imports (local, SLURM), the dispatch round trip (Lambda).
  It is fitted (least squares, at least 0) on the residual time of runs that span two
  or more wave counts; with one wave count it is 0 and the overhead holds it.
- ``overhead_s`` is the rest of a run's end-to-end time (staging, dispatch, result
  fetch, aggregation), fitted per backend and partition size as the mean of
  end_to_end_s - startup_s - waves x invocation_s over the measured runs, and taken
  as constant whatever the data size (a size not measured takes the mean over the
  backend's sizes).

Predictions put one partition in each invocation or job. Costs reuse :mod:`cai.cost`:
Lambda requests and GB-seconds at the architecture's price plus ephemeral storage, the
cold starts billed as init time at the function's memory, plus the S3 requests the
handler and the dispatcher make (counted as :mod:`cai.lambda_run` counts them; data
staging and storage are left out, being paid once whatever the plan); SLURM CPU jobs
as core-hours (threads x partition seconds, summed), GPU jobs as GPU-hours (one GPU
per job, partition seconds summed); local runs cost nothing ("own machine").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from cai.atomic import atomic_path
from cai.cost import (
    LAMBDA_ARCHITECTURES,
    LAMBDA_FREE_EPHEMERAL_MB,
    SECONDS_PER_HOUR,
    Prices,
    hpc_cost,
    lambda_cost,
    lambda_run_s3_requests,
    s3_cost,
)
from cai.errors import ConfigError, DataFormatError
from cai.partition import rows_per_partition
from cai.plan import logical_partitions
from cai.runs_schema import RUN_COLUMNS

_logger = logging.getLogger(__name__)

PLANNER_KEY = "planner"
# Keys of the planner section that are budgets, not assumptions (at most one set).
BUDGET_KEYS = ("time_budget_s", "cost_budget_usd")
LAMBDA_VCPU_MAX = 6  # Lambda gives at most 6 vCPUs (at 10,240 MB)
LAMBDA_MEMORY_MB_RANGE = (128, 10240)  # MB a function may have
LAMBDA_EPHEMERAL_MB_MAX = 10240  # largest /tmp, MB
LAMBDA_TIMEOUT_S = 900  # 15 min: the longest one invocation may run
KINDS = ("local", "slurm", "lambda")
# Columns every runs row needs (memory_mb only on Lambda rows); peak_rss_mb,
# precision and cost_usd are used when present.
REQUIRED_COLUMNS = (
    "backend",
    "kind",
    "device",
    "data_gb",
    "galaxies",
    "partition_mb",
    "batch_size",
    "partitions",
    "invocations",
    "threads",
    "end_to_end_s",
    "partition_s_mean",
)
REL_TOL = 1e-9  # data sizes and partition sizes closer than this are the same
# Measured column of a run -> the prediction that validate() holds against it.
PREDICTED_MEASURES = {"end_to_end_s": "time_s", "cost_usd": "cost_usd"}


@dataclass(frozen=True)
class Assumptions:
    """What the planner cannot measure: limits, slots and start-up times.

    Read from the config's ``planner:`` section; a key left out takes the default
    below. Attributes:
        lambda_concurrency: Lambda invocations in flight at once (account limit).
        lambda_cold_start_s: Seconds a new Lambda execution environment takes to
            start (init); paid once per run in time (first wave) and billed once per
            environment started.
        lambda_memory_mb: Lambda memory sizes to plan for, MB (128..10,240).
        lambda_vcpu_mb: MB of Lambda memory per vCPU's worth of CPU (1,769).
        lambda_architecture: ``x86_64`` or ``arm64``; selects the GB-s price.
        lambda_ephemeral_mb: The function's ``/tmp`` size, MB (512..10,240).
        slurm_slots: SLURM CPU jobs that run at once.
        slurm_gpu_slots: SLURM GPU jobs that run at once.
        slurm_scheduler_wait_s: Queue wait before the first SLURM jobs start, seconds;
            paid once per run.
        local_slots: Local inference jobs that run at once.
        partition_mb: Partition sizes to plan for, MiB.
        data_gb: Data sizes to plan for when none are given (rule ``plan``; ``cai
            plan`` without ``--data-gb``), GiB.
    """

    lambda_concurrency: int = 1000
    lambda_cold_start_s: float = 3.3
    lambda_memory_mb: tuple[int, ...] = (2048, 4096, 6144, 8192, 10240)
    lambda_vcpu_mb: float = 1769.0
    lambda_architecture: str = "x86_64"
    lambda_ephemeral_mb: int = 2048
    slurm_slots: int = 64
    slurm_gpu_slots: int = 4
    slurm_scheduler_wait_s: float = 30.0
    local_slots: int = 1
    partition_mb: tuple[float, ...] = (25.0, 50.0, 75.0, 100.0)
    data_gb: tuple[float, ...] = (1.0, 12.6, 100.0, 1024.0)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The ``planner:`` keys, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any] | None) -> Assumptions:
        """Build from the config's ``planner:`` mapping (None or {}: all defaults).

        Raises:
            ConfigError: A key is unknown, or its value is of the wrong type or out of
                range; the message names ``planner.<key>``, the value and what is
                allowed.
        """
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(
                f"{PLANNER_KEY} is {type(mapping).__name__}; expected a mapping of "
                f"{', '.join(cls.keys())}"
            )
        # The budgets live in the same section but are choices, not assumptions.
        unknown = sorted(set(mapping) - set(cls.keys()) - set(BUDGET_KEYS))
        if unknown:
            raise ConfigError(
                f"{PLANNER_KEY}.{unknown[0]} is not a known key; expected one of "
                f"{', '.join(cls.keys())}"
            )
        default = cls()
        values: dict[str, Any] = {}
        for key in ("lambda_concurrency", "slurm_slots", "slurm_gpu_slots"):
            values[key] = _int_key(mapping, key, getattr(default, key), 1)
        values["local_slots"] = _int_key(mapping, "local_slots", default.local_slots, 1)
        for key in ("lambda_cold_start_s", "slurm_scheduler_wait_s"):
            values[key] = _number_key(mapping, key, getattr(default, key))
        values["lambda_vcpu_mb"] = _number_key(
            mapping, "lambda_vcpu_mb", default.lambda_vcpu_mb, positive=True
        )
        values["lambda_ephemeral_mb"] = _int_key(
            mapping,
            "lambda_ephemeral_mb",
            default.lambda_ephemeral_mb,
            LAMBDA_FREE_EPHEMERAL_MB,
            LAMBDA_EPHEMERAL_MB_MAX,
        )
        architecture = mapping.get("lambda_architecture", default.lambda_architecture)
        if architecture not in LAMBDA_ARCHITECTURES:
            raise ConfigError(
                f"{PLANNER_KEY}.lambda_architecture is {architecture!r}; expected one "
                f"of {', '.join(LAMBDA_ARCHITECTURES)}"
            )
        values["lambda_architecture"] = architecture
        low, high = LAMBDA_MEMORY_MB_RANGE
        memory = _list_key(mapping, "lambda_memory_mb", default.lambda_memory_mb)
        for value in memory:
            if not _is_int(value) or not low <= value <= high:
                raise ConfigError(
                    f"{PLANNER_KEY}.lambda_memory_mb holds {value!r}; expected whole "
                    f"MB from {low} to {high}"
                )
        values["lambda_memory_mb"] = tuple(int(v) for v in memory)
        sizes = _list_key(mapping, "partition_mb", default.partition_mb)
        for value in sizes:
            if not _is_number(value) or value <= 0:
                raise ConfigError(
                    f"{PLANNER_KEY}.partition_mb holds {value!r}; expected sizes in "
                    "MiB > 0"
                )
            try:
                rows_per_partition(value)
            except ValueError as err:
                raise ConfigError(f"{PLANNER_KEY}.partition_mb: {err}") from None
        values["partition_mb"] = tuple(float(v) for v in sizes)
        data_sizes = _list_key(mapping, "data_gb", default.data_gb)
        for value in data_sizes:
            if not _is_number(value) or value <= 0:
                raise ConfigError(
                    f"{PLANNER_KEY}.data_gb holds {value!r}; expected sizes in GiB > 0"
                )
        values["data_gb"] = tuple(float(v) for v in data_sizes)
        return cls(**values)

    def slots(self, kind: str, device: str) -> int:
        """Invocations or jobs of ``kind`` on ``device`` that run at once."""
        if kind == "lambda":
            return self.lambda_concurrency
        if kind == "slurm":
            return self.slurm_gpu_slots if device == "cuda" else self.slurm_slots
        if kind == "local":
            return self.local_slots
        raise DataFormatError(f"kind is {kind!r}; expected one of {', '.join(KINDS)}")

    def startup_s(self, kind: str) -> float:
        """Seconds paid once per run before the first partition starts."""
        if kind == "lambda":
            return self.lambda_cold_start_s
        if kind == "slurm":
            return self.slurm_scheduler_wait_s
        return 0.0

    def cpu_share(self, kind: str, memory_mb: float, threads: float) -> float:
        """vCPUs' worth of CPU an invocation uses: min(memory / vcpu_mb, 6, threads).

        1 for every kind but Lambda, whose CPU is proportional to memory.
        """
        if kind != "lambda":
            return 1.0
        return min(memory_mb / self.lambda_vcpu_mb, LAMBDA_VCPU_MAX, threads)


@dataclass(frozen=True)
class Calibration:
    """The time model fitted to measured runs.

    Attributes:
        table: One row per (backend, batch_size, partition_mb) measured: ``runs``,
            ``kind``, ``device``, ``threads``, ``memory_mb`` (Lambda, else NaN),
            ``galaxies_per_partition``, ``partition_s`` (measured mean),
            ``fixed_s``, ``per_galaxy_s`` (at the measured memory),
            ``variable_cpu_s`` (the per-galaxy part at one vCPU's worth),
            ``overhead_s`` and ``peak_rss_mb`` (NaN when not recorded).
        fits: One row per (backend, batch_size): ``kind``, ``device``, ``threads``,
            ``memory_mb``, ``model`` (``linear`` or ``proportional``), ``fixed_s``,
            ``galaxy_cpu_s`` (seconds per galaxy at one vCPU's worth; at the runs'
            threads off Lambda), ``overhead_s`` (mean over sizes), ``sizes``,
            ``runs`` and ``score`` (normalised seconds per galaxy, lower is faster).
        assumptions: The slots and start-up times subtracted when fitting.
        precision: The model arithmetic of the runs (None when not recorded).
    """

    table: pd.DataFrame
    fits: pd.DataFrame
    assumptions: Assumptions
    precision: str | None = None

    def backends(self) -> list[str]:
        """Backends with measured runs, sorted."""
        return sorted(self.fits["backend"].unique())

    def best_batch_size(self, backend: str) -> int:
        """The measured batch size of ``backend`` with the fewest seconds per galaxy."""
        fits = self._backend_fits(backend)
        return int(fits.sort_values(["score", "batch_size"]).iloc[0]["batch_size"])

    def fit(self, backend: str, batch_size: int) -> pd.Series:
        """The fitted model of ``backend`` at ``batch_size``."""
        fits = self._backend_fits(backend)
        match = fits[fits["batch_size"] == batch_size]
        if match.empty:
            measured = ", ".join(str(b) for b in sorted(fits["batch_size"]))
            raise ConfigError(
                f"backend {backend!r} has no measured run at batch_size {batch_size}; "
                f"measured: {measured}"
            )
        return match.iloc[0]

    def measured(
        self, backend: str, batch_size: int, partition_mb: float
    ) -> pd.Series | None:
        """The calibration row of a measured partition size, or None."""
        table = self.table
        match = table[
            (table["backend"] == backend)
            & (table["batch_size"] == batch_size)
            & np.isclose(table["partition_mb"], partition_mb, rtol=REL_TOL, atol=0)
        ]
        return None if match.empty else match.iloc[0]

    def _backend_fits(self, backend: str) -> pd.DataFrame:
        fits = self.fits[self.fits["backend"] == backend]
        if fits.empty:
            raise ConfigError(
                f"backend {backend!r} has no measured run to plan from; measured: "
                f"{', '.join(self.backends()) or 'none'}"
            )
        return fits


def calibrate(
    runs: pd.DataFrame,
    assumptions: Assumptions | None = None,
    precision: str | None = None,
) -> Calibration:
    """Fit the time model to measured runs.

    Args:
        runs: The runs table (columns of :mod:`cai.runs_schema`; at least
            ``REQUIRED_COLUMNS``, and ``memory_mb`` when there are Lambda rows).
        assumptions: Slots and start-up times of the measured runs (default:
            ``Assumptions()``).
        precision: Keep only runs of this precision. None: the runs must hold one
            precision (or no ``precision`` column).

    Raises:
        DataFormatError: A column is missing, or a value is not a number in range.
        ConfigError: No run is left, or the runs mix precisions and none was chosen.
    """
    started = time.perf_counter()
    assumptions = assumptions or Assumptions()
    runs = _checked_runs(runs, precision)
    groups = []
    fits = []
    for (backend, batch_size), rows in runs.groupby(
        ["backend", "batch_size"], sort=True
    ):
        fit, table = _fit_backend(str(backend), int(batch_size), rows, assumptions)
        fits.append(fit)
        groups.append(table)
    table = pd.concat(groups, ignore_index=True)
    fits_frame = pd.DataFrame(fits)
    held = runs["precision"].dropna() if "precision" in runs else pd.Series()
    used = str(held.iloc[0]) if len(held) else None
    _logger.info(
        "calibrate: %d runs -> %d backends (%s), %d partition sizes measured, %.2f s",
        len(runs),
        fits_frame["backend"].nunique(),
        ", ".join(
            f"{f['backend']} b{f['batch_size']}: {f['model']}, "
            f"{f['galaxy_cpu_s'] * 1e3:.3g} ms/galaxy, overhead {f['overhead_s']:.1f} s"
            for f in fits
        ),
        len(table),
        time.perf_counter() - started,
    )
    return Calibration(table, fits_frame, assumptions, used)


def predict(
    cal: Calibration,
    assumptions: Assumptions,
    prices: Prices,
    data_gb: float,
    backend: str,
    partition_mb: float,
    memory_mb: float | None = None,
    batch_size: int | None = None,
    partitions_per_invocation: int = 1,
) -> dict[str, Any]:
    """Predicted time and cost of predicting ``data_gb`` GiB on one option.

    Args:
        cal: The calibration.
        assumptions: Slots, limits and start-up times of the target.
        prices: Unit prices.
        data_gb: Data size, GiB of 20,504-B galaxies.
        backend: A measured backend.
        partition_mb: Partition size, MiB.
        memory_mb: Lambda memory, MB (default: the measured one); ignored elsewhere.
        batch_size: A measured batch size (default: the backend's fastest).
        partitions_per_invocation: Partitions each invocation or job predicts.

    Returns:
        The option (``backend``, ``kind``, ``device``, ``batch_size``, ``data_gb``,
        ``partition_mb``, ``memory_mb``, ``threads``, ``cpu_share``), its shape
        (``galaxies_per_partition``, ``galaxies``, ``partitions``, ``invocations``,
        ``slots``, ``waves``), the pieces of time (``partition_s``, ``overhead_s``,
        ``startup_s``, ``compute_s``, ``time_s``, ``samples_per_s``), the cost
        (``cost_usd``, ``cost_basis``), ``extrapolated`` (partition size not
        measured), ``feasible`` and ``note``.

    Raises:
        ConfigError: The backend or batch size was not measured, or a size is out
            of range.
    """
    timing = _timing(
        cal,
        assumptions,
        data_gb,
        backend,
        partition_mb,
        memory_mb,
        batch_size,
        partitions_per_invocation,
    )
    timing.update(_costing(timing, assumptions, prices))
    return timing


def plan_table(
    cal: Calibration,
    assumptions: Assumptions,
    prices: Prices,
    data_gb_list: Sequence[float],
) -> pd.DataFrame:
    """Every option for every data size: measured backends (each at its fastest
    batch size) x ``assumptions.partition_mb`` x, on Lambda,
    ``assumptions.lambda_memory_mb``; one row each, as :func:`predict` returns."""
    started = time.perf_counter()
    if not data_gb_list:
        raise ConfigError("data sizes: none given; expected one or more GiB > 0")
    rows = []
    for data_gb in data_gb_list:
        for backend in cal.backends():
            batch_size = cal.best_batch_size(backend)
            kind = cal.fit(backend, batch_size)["kind"]
            memories = assumptions.lambda_memory_mb if kind == "lambda" else (None,)
            for partition_mb in assumptions.partition_mb:
                for memory_mb in memories:
                    rows.append(
                        predict(
                            cal,
                            assumptions,
                            prices,
                            data_gb,
                            backend,
                            partition_mb,
                            memory_mb,
                            batch_size,
                        )
                    )
    table = pd.DataFrame(rows)
    _logger.info(
        "plan: %d options (%d data sizes x %d backends), %d feasible, %.2f s",
        len(table),
        len(data_gb_list),
        len(cal.backends()),
        int(table["feasible"].sum()),
        time.perf_counter() - started,
    )
    return table


def recommend(
    table: pd.DataFrame,
    data_gb: float,
    time_budget_s: float | None = None,
    cost_budget_usd: float | None = None,
) -> dict[str, Any]:
    """The option to choose for ``data_gb`` from a :func:`plan_table`.

    With ``time_budget_s``: the cheapest feasible option that finishes within it
    (ties: the faster). With ``cost_budget_usd``: the fastest that costs at most it
    (ties: the cheaper). With neither: the cheapest (ties: the faster). The row is
    returned as a dict with ``reason`` added.

    Raises:
        ConfigError: Both budgets are given, a budget is negative, the table has no
            feasible option for ``data_gb``, or none fits the budget (the message
            gives the closest option's time and cost).
    """
    if time_budget_s is not None and cost_budget_usd is not None:
        raise ConfigError(
            f"time budget {time_budget_s} s and cost budget {cost_budget_usd} USD both "
            "given; expected at most one"
        )
    for name, budget in (
        ("time budget", time_budget_s),
        ("cost budget", cost_budget_usd),
    ):
        if budget is not None and (not _is_number(budget) or budget < 0):
            raise ConfigError(f"{name} is {budget!r}; expected a number >= 0")
    sized = table[np.isclose(table["data_gb"], data_gb, rtol=REL_TOL, atol=0)]
    options = sized[sized["feasible"]]
    if options.empty:
        planned = ", ".join(f"{v:g}" for v in sorted(table["data_gb"].unique()))
        raise ConfigError(
            f"no feasible option for {data_gb:g} GB in the plan (data sizes planned: "
            f"{planned or 'none'}; {len(sized)} options, all infeasible)"
        )
    if time_budget_s is None and cost_budget_usd is None:
        best = options.sort_values(["cost_usd", "time_s"]).iloc[0]
        reason = "cheapest (no budget given)"
    else:
        # Within the one budget given, the best on the other measure.
        by_time = time_budget_s is not None
        limit = time_budget_s if by_time else cost_budget_usd
        bound, goal = ("time_s", "cost_usd") if by_time else ("cost_usd", "time_s")
        budget = f"{limit:g} s" if by_time else f"${limit:g}"
        fits = options[options[bound] <= limit]
        if fits.empty:
            nearest = options.sort_values([bound, goal]).iloc[0]
            raise ConfigError(
                f"no option predicts {data_gb:g} GB within the "
                f"{'time' if by_time else 'cost'} budget of {budget}; the "
                f"{'fastest' if by_time else 'cheapest'} is {_describe(nearest)}"
            )
        best = fits.sort_values([goal, bound]).iloc[0]
        reason = f"{'cheapest' if by_time else 'fastest'} within {budget}"
    result = best.to_dict()
    result["reason"] = reason
    return result


def recommendations(
    table: pd.DataFrame,
    data_gb_list: Sequence[float],
    time_budget_s: float | None = None,
    cost_budget_usd: float | None = None,
) -> pd.DataFrame:
    """:func:`recommend` for each data size: one row each, with its ``reason``."""
    rows = [
        recommend(table, data_gb, time_budget_s, cost_budget_usd)
        for data_gb in data_gb_list
    ]
    return pd.DataFrame.from_records(rows)


def describe_recommendation(best: Mapping[str, Any]) -> str:
    """One line: the option, its time and cost, why, and what the cost counts."""
    memory = "" if math.isnan(best["memory_mb"]) else f" at {best['memory_mb']:.0f} MB"
    return (
        f"{best['data_gb']:g} GB: {best['backend']} (batch {best['batch_size']}), "
        f"{best['partition_mb']:g} MB partitions{memory}: {best['time_s']:,.1f} s, "
        f"${best['cost_usd']:,.4f} ({best['reason']}; {best['cost_basis']})"
    )


def validate(
    runs: pd.DataFrame,
    calibrate_on: Sequence[float],
    hold_out: Sequence[float],
    assumptions: Assumptions | None = None,
    prices: Prices | None = None,
    precision: str | None = None,
) -> pd.DataFrame:
    """How well runs at some data sizes predict runs at others.

    Calibrates on the runs whose ``data_gb`` is in ``calibrate_on`` and predicts each
    run whose ``data_gb`` is in ``hold_out`` with its own backend, partition size,
    batch size, Lambda memory and partitions per invocation.

    Returns:
        One row per held-out run and measure (``end_to_end_s``; ``cost_usd`` too when
        ``prices`` is given and the runs record it): ``backend``, ``batch_size``,
        ``partition_mb``, ``memory_mb``, ``data_gb``, ``run`` (when recorded),
        ``measure``, ``measured``, ``predicted``, ``rel_error`` ((predicted -
        measured) / measured) and ``extrapolated``.

    Raises:
        ConfigError: No run has a data size of ``calibrate_on`` or ``hold_out``, or a
            held-out run's backend or batch size was not calibrated.
    """
    assumptions = assumptions or Assumptions()
    _require_columns(runs, ("data_gb",))
    train = runs[_in_sizes(runs["data_gb"], calibrate_on)]
    test = runs[_in_sizes(runs["data_gb"], hold_out)]
    present = ", ".join(f"{v:g}" for v in sorted(runs["data_gb"].unique()))
    for name, sizes, chosen in (
        ("calibrate_on", calibrate_on, train),
        ("hold_out", hold_out, test),
    ):
        if chosen.empty:
            asked = ", ".join(f"{v:g}" for v in sizes) or "none"
            raise ConfigError(
                f"{name} data sizes ({asked} GB) match no run; the runs hold {present}"
            )
    cal = calibrate(train, assumptions, precision)
    test = _checked_runs(test, cal.precision)
    measures = ["end_to_end_s"]
    if prices is not None and "cost_usd" in test:
        measures.append("cost_usd")
    rows = []
    for _, run in test.iterrows():
        per_job = math.ceil(int(run["partitions"]) / int(run["invocations"]))
        memory = run["memory_mb"] if run["kind"] == "lambda" else None
        # Predicted as it ran: a Lambda run with the concurrency it had.
        held = assumptions
        if (
            run["kind"] == "lambda"
            and _is_number(run.get("slots"))
            and run["slots"] > 0
        ):
            held = dataclasses.replace(
                assumptions, lambda_concurrency=int(run["slots"])
            )
        args = (
            cal,
            held,
            run["data_gb"],
            run["backend"],
            run["partition_mb"],
            memory,
            int(run["batch_size"]),
            per_job,
        )
        predicted = (
            _timing(*args) if prices is None else predict(cal, held, prices, *args[2:])
        )
        for measure in measures:
            measured = float(run[measure])
            rows.append(
                {
                    "backend": run["backend"],
                    "batch_size": int(run["batch_size"]),
                    "partition_mb": float(run["partition_mb"]),
                    "memory_mb": predicted["memory_mb"],
                    "data_gb": float(run["data_gb"]),
                    "run": run.get("run"),
                    "measure": measure,
                    "measured": measured,
                    "predicted": predicted[PREDICTED_MEASURES[measure]],
                    "extrapolated": predicted["extrapolated"],
                }
            )
    report = pd.DataFrame(rows)
    report["rel_error"] = (report["predicted"] - report["measured"]) / report[
        "measured"
    ].where(report["measured"] != 0)
    timing = report[report["measure"] == "end_to_end_s"]["rel_error"].abs()
    _logger.info(
        "validate: calibrated on %d runs (%s GB), %d held out (%s GB); end-to-end "
        "relative error median %.1f%%, max %.1f%%",
        len(train),
        ", ".join(f"{v:g}" for v in calibrate_on),
        len(test),
        ", ".join(f"{v:g}" for v in hold_out),
        100 * timing.median(),
        100 * timing.max(),
    )
    return report


def format_table(table: pd.DataFrame) -> str:
    """The plan as aligned text: one line an option, seconds and dollars."""
    shown = pd.DataFrame(
        {
            "data_gb": table["data_gb"].map(lambda v: f"{v:g}"),
            "backend": table["backend"],
            "batch": table["batch_size"].map(str),
            "part_mb": table["partition_mb"].map(lambda v: f"{v:g}"),
            "memory_mb": table["memory_mb"].map(
                lambda v: "-" if pd.isna(v) else f"{v:.0f}"
            ),
            "partitions": table["partitions"].map(lambda v: f"{v:,}"),
            "waves": table["waves"].map(lambda v: f"{v:,}"),
            "partition_s": table["partition_s"].map(lambda v: f"{v:,.1f} s"),
            "time": table["time_s"].map(lambda v: f"{v:,.1f} s"),
            "cost": table["cost_usd"].map(lambda v: f"${v:,.4f}"),
            "extrapolated": table["extrapolated"].map(lambda v: "yes" if v else ""),
            "note": table["note"],
        }
    )
    for column in ("backend", "note"):  # text reads better left-aligned
        width = max(shown[column].str.len().max(), len(column))
        shown[column] = shown[column].str.ljust(width)
        shown = shown.rename(columns={column: column.ljust(width)})
    return "\n".join(line.rstrip() for line in shown.to_string(index=False).split("\n"))


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the plan as TSV, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def _timing(
    cal: Calibration,
    assumptions: Assumptions,
    data_gb: float,
    backend: str,
    partition_mb: float,
    memory_mb: float | None,
    batch_size: int | None,
    partitions_per_invocation: int,
) -> dict[str, Any]:
    if batch_size is None:
        batch_size = cal.best_batch_size(backend)
    fit = cal.fit(backend, batch_size)
    if not _is_number(data_gb) or data_gb <= 0:
        raise ConfigError(f"data size is {data_gb!r} GB; expected a number > 0")
    if not _is_int(partitions_per_invocation) or partitions_per_invocation < 1:
        raise ConfigError(
            f"partitions_per_invocation is {partitions_per_invocation!r}; expected an "
            "integer >= 1"
        )
    try:
        galaxies_per_partition = rows_per_partition(partition_mb)
    except ValueError as err:
        raise ConfigError(f"partition_mb: {err}") from None
    kind, device = fit["kind"], fit["device"]
    threads = float(fit["threads"])
    notes = []
    row = cal.measured(backend, batch_size, partition_mb)
    measured_mb = float((fit if row is None else row)["memory_mb"])
    if kind == "lambda":
        low, high = LAMBDA_MEMORY_MB_RANGE
        if memory_mb is None or pd.isna(memory_mb):
            memory_mb = measured_mb
        if not low <= memory_mb <= high:
            raise ConfigError(
                f"memory_mb is {memory_mb!r}; expected Lambda memory from {low} to "
                f"{high} MB"
            )
    else:
        memory_mb = math.nan
    share = assumptions.cpu_share(kind, memory_mb, threads)
    if row is None:
        variable_cpu_s = float(fit["galaxy_cpu_s"]) * galaxies_per_partition
        overhead_s = float(fit["overhead_s"])
        peak_rss_mb = _rss_estimate(cal, backend, batch_size, galaxies_per_partition)
        notes.append(f"{partition_mb:g} MB not measured: from the per-galaxy rate")
    else:
        variable_cpu_s = float(row["variable_cpu_s"])
        overhead_s = float(row["overhead_s"])
        peak_rss_mb = float(row["peak_rss_mb"])
    partition_s = float(fit["fixed_s"]) + variable_cpu_s / share
    if kind == "lambda" and not math.isclose(memory_mb, measured_mb):
        notes.append(f"CPU scaled from {measured_mb:.0f} MB")

    partitions = logical_partitions(data_gb, partition_mb)
    invocations = math.ceil(partitions / partitions_per_invocation)
    slots = assumptions.slots(kind, device)
    waves = math.ceil(invocations / slots)
    invocation_start_s = float(fit.get("invocation_start_s", 0.0))
    invocation_s = partitions_per_invocation * partition_s + invocation_start_s
    compute_s = waves * invocation_s
    startup_s = assumptions.startup_s(kind)
    time_s = overhead_s + startup_s + compute_s
    galaxies = partitions * galaxies_per_partition
    feasible = True
    if kind == "lambda":
        if invocation_s + startup_s > LAMBDA_TIMEOUT_S:
            feasible = False
            notes.append(
                f"an invocation takes {invocation_s + startup_s:.0f} s, over Lambda's "
                f"{LAMBDA_TIMEOUT_S} s limit"
            )
        if not math.isnan(peak_rss_mb) and peak_rss_mb > memory_mb:
            feasible = False
            notes.append(f"needs {peak_rss_mb:.0f} MB of memory")
    return {
        "backend": backend,
        "kind": kind,
        "device": device,
        "batch_size": int(batch_size),
        "data_gb": float(data_gb),
        "partition_mb": float(partition_mb),
        "memory_mb": float(memory_mb),
        "threads": int(threads),
        "cpu_share": share,
        "galaxies_per_partition": galaxies_per_partition,
        "galaxies": galaxies,
        "partitions": partitions,
        "invocations": invocations,
        "partitions_per_invocation": partitions_per_invocation,
        "slots": slots,
        "waves": waves,
        "partition_s": partition_s,
        "invocation_start_s": invocation_start_s,
        "overhead_s": overhead_s,
        "startup_s": startup_s,
        "compute_s": compute_s,
        "time_s": time_s,
        "samples_per_s": galaxies / time_s if time_s > 0 else math.nan,
        "extrapolated": row is None,
        "feasible": feasible,
        "note": "; ".join(notes),
    }


def _costing(
    timing: Mapping[str, Any], assumptions: Assumptions, prices: Prices
) -> dict[str, Any]:
    kind = timing["kind"]
    invocations = timing["invocations"]
    job_s = (
        timing["partitions_per_invocation"] * timing["partition_s"]
        + timing["invocation_start_s"]
    )
    if kind == "lambda":
        cold_starts = min(invocations, assumptions.lambda_concurrency)
        billed_s = invocations * job_s + cold_starts * assumptions.lambda_cold_start_s
        record = {
            "billed_ms": billed_s * 1000.0,
            "memory_mb": timing["memory_mb"],
            "requests": invocations,
        }
        lam = lambda_cost(
            [record],
            prices,
            assumptions.lambda_architecture,
            assumptions.lambda_ephemeral_mb,
        )
        puts, gets = lambda_run_s3_requests(
            timing["partitions"], cold_starts, invocations, invocations
        )
        s3 = s3_cost(puts=puts, gets=gets, prices=prices)
        return {
            "cost_usd": lam["total_usd"] + s3["total_usd"],
            "cost_basis": (
                f"Lambda {invocations:,} requests, {lam['gb_s']:,.0f} GB-s at "
                f"{timing['memory_mb']:.0f} MB {assumptions.lambda_architecture} "
                f"({cold_starts:,} cold starts billed), /tmp "
                f"{assumptions.lambda_ephemeral_mb} MB; S3 {gets:,} GET, {puts:,} PUT"
            ),
        }
    if kind == "slurm":
        seconds = invocations * job_s
        if timing["device"] == "cuda":
            # A GPU job holds its CPU cores too; priced as the runs table prices it.
            hours = seconds / SECONDS_PER_HOUR
            hpc = hpc_cost(timing["threads"] * hours, hours, prices)
            basis = (
                f"SLURM {hpc['gpu_hours']:,.2f} GPU-hours (1 GPU a job) and "
                f"{hpc['core_hours']:,.2f} core-hours ({timing['threads']} threads a job)"
            )
        else:
            core_hours = timing["threads"] * seconds / SECONDS_PER_HOUR
            hpc = hpc_cost(core_hours, 0.0, prices)
            basis = (
                f"SLURM {hpc['core_hours']:,.2f} core-hours ({timing['threads']} "
                "threads a job)"
            )
        return {"cost_usd": hpc["total_usd"], "cost_basis": basis}
    return {"cost_usd": 0.0, "cost_basis": "own machine"}


def _fit_backend(
    backend: str, batch_size: int, rows: pd.DataFrame, assumptions: Assumptions
) -> tuple[dict[str, Any], pd.DataFrame]:
    kinds = sorted(rows["kind"].unique())
    devices = sorted(rows["device"].unique())
    if len(kinds) > 1 or len(devices) > 1:
        raise DataFormatError(
            f"backend {backend!r} runs mix kinds {kinds} or devices {devices}; "
            "expected one kind and one device per backend"
        )
    kind, device = kinds[0], devices[0]
    if kind != "lambda" and rows["threads"].nunique() > 1:
        _logger.warning(
            "calibrate: %s b%d runs used %s threads; their times are averaged as one "
            "setting (calibrate them apart by giving them different backend names)",
            backend,
            batch_size,
            sorted(rows["threads"].unique()),
        )
    galaxies = rows["galaxies"] / rows["partitions"]
    memory = rows["memory_mb"] if kind == "lambda" else pd.Series(math.nan, rows.index)
    share = pd.Series(
        [
            assumptions.cpu_share(kind, m, t)
            for m, t in zip(memory, rows["threads"], strict=True)
        ],
        index=rows.index,
    )
    x = (galaxies / share).to_numpy(float)
    # A partition's steady time: the median, so that the model load a job pays once
    # (in its first partition's wall time) counts per job or run, not per partition.
    part_s = rows.get("partition_s_p50")
    if part_s is None or part_s.isna().any():
        part_s = rows["partition_s_mean"]
    part_s = part_s.astype(float)
    y = part_s.to_numpy(float)
    sizes = rows["partition_mb"].nunique()
    model, fixed_s, slope = "proportional", 0.0, float(x @ y / (x @ x))
    if sizes > 1:
        design = np.column_stack([np.ones_like(x), x])
        (intercept, linear_slope), *_ = np.linalg.lstsq(design, y, rcond=None)
        if intercept >= 0:
            model, fixed_s, slope = "linear", float(intercept), float(linear_slope)
        else:
            _logger.warning(
                "calibrate: %s b%d: the fit across %d partition sizes gives a negative "
                "fixed time (%.2f s); using a proportional model instead",
                backend,
                batch_size,
                sizes,
                intercept,
            )
    # What ran at once in each measured run: its own slots where the table has them
    # (Lambda: the dispatcher's concurrency), else the assumption's.
    slots = pd.Series(float(assumptions.slots(kind, device)), index=rows.index)
    if "slots" in rows:
        measured_slots = rows["slots"].astype(float)
        slots = measured_slots.where(measured_slots > 0, slots)
    per_job = np.ceil(rows["partitions"] / rows["invocations"])
    waves = np.ceil(rows["invocations"] / slots)
    # A Lambda run's measured cold start (its table column) is taken out as measured,
    # so that predictions add the assumed one; else the assumed start-up is.
    startup = pd.Series(assumptions.startup_s(kind), index=rows.index)
    if kind == "lambda" and "cold_start_s" in rows:
        measured = rows["cold_start_s"].astype(float)
        startup = measured.where(measured.notna(), startup)
    residual = rows["end_to_end_s"] - startup - waves * per_job * part_s
    # What each wave adds beyond its partitions' own seconds (a job's or invocation's
    # start: process, imports, scheduling, the dispatch round trip), fitted when the
    # runs span two or more wave counts; else 0 and all of it is overhead.
    start_s = 0.0
    if waves.nunique() > 1:
        design = np.column_stack([np.ones(len(waves)), waves.to_numpy(float)])
        (_, wave_slope), *_ = np.linalg.lstsq(
            design, residual.to_numpy(float), rcond=None
        )
        start_s = max(float(wave_slope), 0.0)
    overhead = residual - waves * start_s
    frame = pd.DataFrame(
        {
            "partition_mb": rows["partition_mb"].astype(float),
            "galaxies_per_partition": galaxies,
            "threads": rows["threads"].astype(float),
            "memory_mb": memory.astype(float),
            "partition_s": part_s,
            "variable_cpu_s": (part_s - fixed_s) * share,
            "overhead_s": overhead,
            "score": part_s * share / galaxies,
            "peak_rss_mb": rows.get("peak_rss_mb", math.nan),
        }
    )
    # Each measured partition size's typical run: the median over its runs, so that
    # one cold run (the first process to read torch from disk took twice the others'
    # overhead in a CI experiment) does not set the overhead predicted for all.
    table = (
        frame.groupby("partition_mb", sort=True)
        .agg(
            runs=("partition_s", "size"),
            galaxies_per_partition=("galaxies_per_partition", "mean"),
            threads=("threads", "median"),
            memory_mb=("memory_mb", "median"),
            partition_s=("partition_s", "median"),
            variable_cpu_s=("variable_cpu_s", "median"),
            overhead_s=("overhead_s", "median"),
            peak_rss_mb=("peak_rss_mb", "max"),
        )
        .reset_index()
    )
    negative = table["overhead_s"] < 0
    if negative.any():
        _logger.warning(
            "calibrate: %s b%d: end-to-end times at %s MB are shorter than the model's "
            "start-up (%.1f s) plus waves x partition seconds: overhead set to 0 "
            "(are the slots or start-up seconds in planner: too large?)",
            backend,
            batch_size,
            ", ".join(f"{v:g}" for v in table.loc[negative, "partition_mb"]),
            assumptions.startup_s(kind),
        )
        table.loc[negative, "overhead_s"] = 0.0
    table.insert(0, "backend", backend)
    table.insert(1, "kind", kind)
    table.insert(2, "device", device)
    table.insert(3, "batch_size", batch_size)
    table["fixed_s"] = fixed_s
    share_measured = [
        assumptions.cpu_share(kind, m, t)
        for m, t in zip(table["memory_mb"], table["threads"], strict=True)
    ]
    table["cpu_share"] = share_measured
    table["per_galaxy_s"] = (
        table["variable_cpu_s"] / table["cpu_share"] / table["galaxies_per_partition"]
    )
    fit = {
        "backend": backend,
        "kind": kind,
        "device": device,
        "batch_size": batch_size,
        "threads": float(rows["threads"].median()),
        "memory_mb": float(memory.median()),
        "model": model,
        "fixed_s": fixed_s,
        "invocation_start_s": start_s,
        "galaxy_cpu_s": slope,
        "overhead_s": float(table["overhead_s"].mean()),
        "sizes": int(sizes),
        "runs": len(rows),
        "score": float(frame["score"].mean()),
    }
    return fit, table


def _rss_estimate(
    cal: Calibration, backend: str, batch_size: int, galaxies: int
) -> float:
    """Peak RSS at a partition size not measured: a line through the measured sizes
    (NaN with fewer than two)."""
    table = cal.table
    known = table[
        (table["backend"] == backend)
        & (table["batch_size"] == batch_size)
        & table["peak_rss_mb"].notna()
    ]
    if known["partition_mb"].nunique() < 2:
        return math.nan
    slope, intercept = np.polyfit(
        known["galaxies_per_partition"], known["peak_rss_mb"], 1
    )
    return float(intercept + slope * galaxies)


def _checked_runs(runs: pd.DataFrame, precision: str | None) -> pd.DataFrame:
    if not isinstance(runs, pd.DataFrame):
        raise DataFormatError(
            f"runs is {type(runs).__name__}; expected a pandas DataFrame"
        )
    _require_columns(runs, REQUIRED_COLUMNS)
    unmeasured = runs["end_to_end_s"].isna()
    if unmeasured.any():
        _logger.warning(
            "calibrate: %d runs without an end-to-end time (partly reused results) "
            "left out: %s",
            int(unmeasured.sum()),
            ", ".join(map(str, runs.loc[unmeasured, "run"])) if "run" in runs else "",
        )
        runs = runs[~unmeasured]
    if runs.empty:
        raise ConfigError("runs table has no row; expected measured runs to plan from")
    runs = runs.reset_index(drop=True)
    if "precision" in runs:
        held = sorted(runs["precision"].dropna().unique())
        if precision is not None:
            runs = runs[runs["precision"] == precision].reset_index(drop=True)
            if runs.empty:
                raise ConfigError(
                    f"precision {precision!r}: no run of it; the runs hold "
                    f"{', '.join(held) or 'none'}"
                )
        elif len(held) > 1:
            raise ConfigError(
                f"runs mix precisions {', '.join(held)}; choose one (--precision)"
            )
    bad_kind = ~runs["kind"].isin(KINDS)
    if bad_kind.any():
        index = int(np.flatnonzero(bad_kind)[0])
        raise DataFormatError(
            f"runs row {index}: kind is {_plain(runs['kind'].iloc[index])!r}; "
            f"expected one of {', '.join(KINDS)}"
        )
    lambda_rows = runs["kind"] == "lambda"
    if lambda_rows.any():
        _require_columns(runs, ("memory_mb",))
    for column in REQUIRED_COLUMNS[3:]:
        _check_column(runs, column, pd.Series(True, runs.index))
    if lambda_rows.any():
        _check_column(runs, "memory_mb", lambda_rows, positive=True)
    for column in ("galaxies", "partitions", "invocations", "threads", "batch_size"):
        _check_column(runs, column, pd.Series(True, runs.index), positive=True)
    return runs


def _require_columns(runs: pd.DataFrame, columns: Sequence[str]) -> None:
    for column in columns:
        if column not in runs.columns:
            meaning = RUN_COLUMNS.get(column, ("", ""))[1]
            raise DataFormatError(
                f"runs table has no column {column!r} ({meaning}); expected the "
                "columns of cai.runs_schema"
            )


def _check_column(
    runs: pd.DataFrame, column: str, rows: pd.Series, positive: bool = False
) -> None:
    values = pd.to_numeric(runs[column], errors="coerce")
    bad = rows & ~(np.isfinite(values) & (values > 0 if positive else values >= 0))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        where = f" (run {runs['run'].iloc[index]})" if "run" in runs else ""
        raise DataFormatError(
            f"runs row {index}{where}: {column} is {_plain(runs[column].iloc[index])!r}; "
            f"expected a number {'> 0' if positive else '>= 0'}"
        )


def _in_sizes(values: pd.Series, sizes: Sequence[float]) -> pd.Series:
    mask = pd.Series(False, index=values.index)
    for size in sizes:
        mask |= np.isclose(values.astype(float), size, rtol=REL_TOL, atol=0)
    return mask


def _describe(option: pd.Series) -> str:
    memory = "" if pd.isna(option["memory_mb"]) else f" at {option['memory_mb']:.0f} MB"
    return (
        f"{option['backend']} with {option['partition_mb']:g} MB partitions{memory}: "
        f"{option['time_s']:,.1f} s, ${option['cost_usd']:,.4f}"
    )


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_number(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
    )


def _is_int(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def _int_key(
    mapping: Mapping[str, Any],
    key: str,
    default: int,
    low: int,
    high: int | None = None,
) -> int:
    value = mapping.get(key, default)
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ConfigError(
            f"{PLANNER_KEY}.{key} is {value!r}; expected a whole number {allowed}"
        )
    return int(value)


def _number_key(
    mapping: Mapping[str, Any], key: str, default: float, positive: bool = False
) -> float:
    value = mapping.get(key, default)
    if not _is_number(value) or value < 0 or (positive and value == 0):
        raise ConfigError(
            f"{PLANNER_KEY}.{key} is {value!r}; expected a number "
            f"{'> 0' if positive else '>= 0'} (seconds or MB, see config/config.yaml)"
        )
    return float(value)


def _list_key(
    mapping: Mapping[str, Any], key: str, default: Sequence[Any]
) -> list[Any]:
    value = mapping.get(key, default)
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"{PLANNER_KEY}.{key} is {value!r}; expected a non-empty list"
        )
    return list(value)
