"""Figures of an experiment: time, throughput, invocations and cost of every backend.

Input is the runs table of rule ``experiment_table`` (columns in
:data:`cai.runs_schema.RUN_COLUMNS`, one row per run). Each point is the mean over the
repeats of one setting, with an error bar from their minimum to their maximum; a point
of one repeat has no bar. The figures, each written as ``<name>.png`` and ``<name>.pdf``:

``time_vs_data_size``
    End-to-end seconds against data size, one series per backend. Each backend is shown
    at its largest batch size and, at that batch size, at the partition size with the
    most distinct data sizes (ties: the smallest); the title says which.
``throughput_vs_batch_size``
    Galaxies per second (wall clock) against batch size on a base-2 axis, one series per
    backend, at the data size with the most distinct batch sizes (ties: the smallest)
    and, there, the partition size with the most distinct batch sizes (ties: smallest).
``lambda_time_vs_data_size``
    Lambda runs only: end-to-end seconds against data size, one series per partition
    size (``"25 MB"``), each at its largest batch size.
``throughput_vs_data_size``
    Lambda runs only: all input bits over end-to-end seconds against data size, one
    solid series per partition size (``"25 MB"``), and dashed the paper's aggregate, the
    sum over partitions of each one's bits over its own inference seconds
    (``"25 MB (sum of rates)"``). The unit (Gbit/s, Mbit/s, ...) follows the magnitude.
``invocations_vs_data_size``
    Lambda invocations, or inference jobs for the other backends, against data size, one
    series per backend and partition size (``"lambda 25 MB"``), at the largest batch.
``cost_vs_data_size``
    Cost in USD against data size per backend, at the setting of ``time_vs_data_size``.
``extension``
    End-to-end seconds of the runs at 100 GiB or more (the paper's 100 GB to 1 TB
    extension) per backend, setting chosen as in ``time_vs_data_size`` among those runs.

An axis is logarithmic when its values span more than 1.5 decades, linear otherwise.
On a logarithmic axis the points at zero or below (the local backend's cost of $0) are
not drawn, and a note in the figure counts them per series; a series left with no
point is not drawn and not listed. A figure without a series is still written, with a
centred note, so that the workflow's outputs always exist.
"""

from __future__ import annotations

import logging
import os
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from cai.atomic import atomic_path, write_json
from cai.errors import DataFormatError

_logger = logging.getLogger(__name__)

DPI = 120
FIGURE_SIZE_IN = (6.4, 4.6)
LOG_SCALE_MIN_DECADES = 1.5  # an axis spanning more decades than this is logarithmic
EXTENSION_MIN_GB = 100.0  # the paper's extension runs from 100 GB to 1 TB
TITLE_WRAP_CHARS = 90
SOURCE = "runs table from rule experiment_table"
BIT_UNITS = ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s"), (1.0, "bit/s"))

FIGURE_NAMES = (
    "time_vs_data_size",
    "throughput_vs_batch_size",
    "lambda_time_vs_data_size",
    "throughput_vs_data_size",
    "invocations_vs_data_size",
    "cost_vs_data_size",
    "extension",
)
REQUIRED_COLUMNS = (
    "backend",
    "kind",
    "data_gb",
    "partition_mb",
    "batch_size",
    "repeat",
    "invocations",
    "end_to_end_s",
    "throughput_sum_bits_per_s",
    "throughput_wall_bits_per_s",
    "throughput_wall_samples_per_s",
    "cost_usd",
)
NUMERIC_COLUMNS = tuple(c for c in REQUIRED_COLUMNS if c not in ("backend", "kind"))
DATA_SIZE_LABEL = "data size (GiB)"


@dataclass(frozen=True)
class _Series:
    """One line of a figure: x, and the mean, min and max over repeats at each x."""

    label: str
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    color: str | None = None
    dashed: bool = False

    def subset(self, keep: np.ndarray) -> _Series:
        return replace(
            self,
            x=self.x[keep],
            mean=self.mean[keep],
            low=self.low[keep],
            high=self.high[keep],
        )


@dataclass(frozen=True)
class _Plot:
    """What one figure draws and how its axes are labelled."""

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: list[_Series]
    setting: str = ""  # which partition size, batch size or data size, for the title
    x_base2: bool = False  # log2 x axis with a tick at each value
    empty_note: str = "no run with data for this figure"


def _at(rows: pd.DataFrame, column: str, value: float) -> pd.DataFrame:
    """The rows whose ``column`` equals ``value`` (NaN matches NaN)."""
    mask = rows[column].isna() if pd.isna(value) else rows[column] == value
    return rows[mask]


def _most_distinct(rows: pd.DataFrame, column: str, distinct: str) -> float:
    """The ``column`` value whose rows hold the most distinct ``distinct`` values.

    Ties go to the smallest value; NaN comes last.
    """
    counts = rows.groupby(column, dropna=False)[distinct].nunique()
    best = counts[counts == counts.max()].index
    return min(best, key=lambda v: (pd.isna(v), 0.0 if pd.isna(v) else v))


def _largest_batch(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows at the largest batch size among ``rows``."""
    return _at(rows, "batch_size", rows["batch_size"].max())


def _mb(value: float) -> str:
    return "unpartitioned" if pd.isna(value) else f"{value:g} MB"


def _choose_setting(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """One backend's rows for a figure against data size, and the setting in words.

    Largest batch size, then the partition size with the most distinct data sizes
    (ties: the smallest).
    """
    rows = _largest_batch(rows)
    partition = _most_distinct(rows, "partition_mb", "data_gb")
    batch = int(rows["batch_size"].iloc[0])
    return _at(
        rows, "partition_mb", partition
    ), f"{_mb(partition)} partitions, batch {batch}"


def _aggregate(
    rows: pd.DataFrame,
    x: str,
    y: str,
    label: str,
    *,
    scale: float = 1.0,
    color: str | None = None,
    dashed: bool = False,
) -> _Series | None:
    """Mean, min and max of ``y`` over the repeats at each ``x``; None when no point."""
    known = rows[[x, y]].dropna()
    if known.empty:
        return None
    stats = known.groupby(x)[y].agg(["mean", "min", "max"]).sort_index() / scale
    return _Series(
        label=label,
        x=stats.index.to_numpy(dtype=float),
        mean=stats["mean"].to_numpy(dtype=float),
        low=stats["min"].to_numpy(dtype=float),
        high=stats["max"].to_numpy(dtype=float),
        color=color,
        dashed=dashed,
    )


def _spans_decades(values: np.ndarray) -> bool:
    """Whether the positive finite ``values`` span more than LOG_SCALE_MIN_DECADES."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size < 2:
        return False
    return bool(np.log10(positive.max() / positive.min()) > LOG_SCALE_MIN_DECADES)


def _bit_unit(values: np.ndarray) -> tuple[float, str]:
    """The bits-per-second unit (divisor, name) that suits the largest of ``values``."""
    finite = values[np.isfinite(values)]
    largest = float(np.abs(finite).max()) if finite.size else 0.0
    for divisor, name in BIT_UNITS:
        if largest >= divisor:
            return divisor, name
    return BIT_UNITS[-1]


def _per_backend(
    runs: pd.DataFrame,
    y: str,
    *,
    min_gb: float | None = None,
    below_gb: float | None = None,
) -> tuple[list[_Series], str]:
    """One series of ``y`` against data size per backend, at each one's chosen setting,
    over data sizes in [min_gb, below_gb)."""
    if min_gb is not None:
        runs = runs[runs["data_gb"] >= min_gb]
    if below_gb is not None:
        runs = runs[runs["data_gb"] < below_gb]
    series, settings = [], []
    for backend, rows in runs.groupby("backend", sort=True):
        rows = rows.dropna(subset=["data_gb", y])
        if rows.empty:
            continue
        chosen, setting = _choose_setting(rows)
        line = _aggregate(chosen, "data_gb", y, str(backend))
        if line is not None:
            series.append(line)
            settings.append(f"{backend}: {setting}")
    return series, "; ".join(settings)


def _per_partition(lam: pd.DataFrame, y: str) -> list[tuple[float, pd.DataFrame]]:
    """Lambda rows per partition size, each at its largest batch size, with ``y`` known."""
    groups = []
    for partition, rows in lam.groupby("partition_mb", dropna=False, sort=True):
        rows = rows.dropna(subset=["data_gb", y])
        if not rows.empty:
            groups.append((partition, _largest_batch(rows)))
    return groups


def _batches_in_words(groups: list[tuple[float, pd.DataFrame]]) -> str:
    batches = {_mb(p): int(rows["batch_size"].iloc[0]) for p, rows in groups}
    if len(set(batches.values())) == 1:
        return f"batch {next(iter(batches.values()))}"
    return "batch " + ", ".join(f"{b} at {p}" for p, b in batches.items())


def _time_vs_data_size(runs: pd.DataFrame) -> _Plot:
    # The 1 TB extension has its own figure: its partition size must not decide
    # the setting drawn here.
    series, setting = _per_backend(runs, "end_to_end_s", below_gb=EXTENSION_MIN_GB)
    return _Plot(
        "time_vs_data_size",
        "End-to-end time against data size",
        DATA_SIZE_LABEL,
        "end-to-end time (s)",
        series,
        setting,
    )


def _throughput_vs_batch_size(runs: pd.DataFrame) -> _Plot:
    y = "throughput_wall_samples_per_s"
    series, settings = [], []
    for backend, rows in runs.groupby("backend", sort=True):
        rows = rows.dropna(subset=["batch_size", y])
        if rows.empty:
            continue
        size = _most_distinct(rows, "data_gb", "batch_size")
        rows = _at(rows, "data_gb", size)
        partition = _most_distinct(rows, "partition_mb", "batch_size")
        line = _aggregate(
            _at(rows, "partition_mb", partition), "batch_size", y, backend
        )
        if line is not None:
            series.append(line)
            settings.append(f"{backend}: {size:g} GiB, {_mb(partition)} partitions")
    return _Plot(
        "throughput_vs_batch_size",
        "Throughput against batch size",
        "batch size (galaxies per forward pass)",
        "throughput, galaxies over end-to-end time (galaxies/s)",
        series,
        "; ".join(settings),
        x_base2=True,
    )


def _lambda_time_vs_data_size(lam: pd.DataFrame) -> _Plot:
    groups = _per_partition(lam, "end_to_end_s")
    series = [
        _aggregate(rows, "data_gb", "end_to_end_s", _mb(partition), color=f"C{i}")
        for i, (partition, rows) in enumerate(groups)
    ]
    return _Plot(
        "lambda_time_vs_data_size",
        "Lambda: end-to-end time against data size per partition size",
        DATA_SIZE_LABEL,
        "end-to-end time (s)",
        [s for s in series if s is not None],
        _batches_in_words(groups) if groups else "",
    )


def _throughput_vs_data_size(lam: pd.DataFrame) -> _Plot:
    wall, total = "throughput_wall_bits_per_s", "throughput_sum_bits_per_s"
    divisor, unit = _bit_unit(lam[[wall, total]].to_numpy(dtype=float).ravel())
    series: list[_Series | None] = []
    groups = _per_partition(lam, wall)
    for i, (partition, rows) in enumerate(groups):
        label = _mb(partition)
        series.append(
            _aggregate(rows, "data_gb", wall, label, scale=divisor, color=f"C{i}")
        )
        series.append(
            _aggregate(
                rows,
                "data_gb",
                total,
                f"{label} (sum of rates)",
                scale=divisor,
                color=f"C{i}",
                dashed=True,
            )
        )
    return _Plot(
        "throughput_vs_data_size",
        "Lambda: throughput against data size (dashed: sum of per-partition rates)",
        DATA_SIZE_LABEL,
        f"throughput, input bits over time ({unit})",
        [s for s in series if s is not None],
        _batches_in_words(groups) if groups else "",
    )


def _invocations_vs_data_size(runs: pd.DataFrame) -> _Plot:
    series = []
    for (backend, partition), rows in runs.groupby(
        ["backend", "partition_mb"], dropna=False, sort=True
    ):
        rows = rows.dropna(subset=["data_gb", "invocations"])
        if rows.empty:
            continue
        line = _aggregate(
            _largest_batch(rows),
            "data_gb",
            "invocations",
            f"{backend} {_mb(partition)}",
        )
        if line is not None:
            series.append(line)
    return _Plot(
        "invocations_vs_data_size",
        "Invocations (Lambda) or inference jobs against data size",
        DATA_SIZE_LABEL,
        "invocations or jobs (count)",
        series,
        "each at its largest batch size",
    )


def _cost_vs_data_size(runs: pd.DataFrame) -> _Plot:
    # The 1 TB extension has its own figure: its partition size must not decide
    # the setting drawn here.
    series, setting = _per_backend(runs, "cost_usd", below_gb=EXTENSION_MIN_GB)
    return _Plot(
        "cost_vs_data_size",
        "Cost against data size",
        DATA_SIZE_LABEL,
        "cost (USD)",
        series,
        setting,
    )


def _extension(runs: pd.DataFrame) -> _Plot:
    series, setting = _per_backend(runs, "end_to_end_s", min_gb=EXTENSION_MIN_GB)
    return _Plot(
        "extension",
        f"Extension: end-to-end time at {EXTENSION_MIN_GB:g} GiB or more",
        DATA_SIZE_LABEL,
        "end-to-end time (s)",
        series,
        setting,
        empty_note=f"no run at {EXTENSION_MIN_GB:g} GB or more in this experiment",
    )


def _drop_non_positive(
    series: list[_Series], axis: str
) -> tuple[list[_Series], list[str]]:
    """Remove the points at zero or below on a log ``axis``; notes counting them."""
    kept, notes = [], []
    for line in series:
        values = line.x if axis == "x" else line.mean
        keep = values > 0
        dropped = int((~keep).sum())
        if dropped:
            notes.append(
                f"{line.label}: {dropped} point(s) <= 0 not shown on log {axis}"
            )
        if keep.any():
            kept.append(line.subset(keep))
    return kept, notes


def _draw(plot: _Plot, out_dir: Path, formats: Sequence[str]) -> tuple[list[str], int]:
    """Write ``plot`` in every format; return the labels drawn and the point count."""
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.subplots()
    series = plot.series
    every_x = np.concatenate([s.x for s in series]) if series else np.array([])
    every_y = np.concatenate([s.mean for s in series]) if series else np.array([])
    notes: list[str] = []
    log_x = plot.x_base2 or _spans_decades(every_x)
    if log_x:
        series, dropped = _drop_non_positive(series, "x")
        notes += dropped
    if _spans_decades(every_y):
        series, dropped = _drop_non_positive(series, "y")
        notes += dropped
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log", base=2 if plot.x_base2 else 10)
    for line in series:
        ax.errorbar(
            line.x,
            line.mean,
            yerr=np.vstack([line.mean - line.low, line.high - line.mean]),
            label=line.label,
            color=line.color,
            ls="--" if line.dashed else "-",
            marker="o",
            markersize=4,
            capsize=3,
        )
    if plot.x_base2 and series:
        ticks = np.unique(np.concatenate([s.x for s in series]))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    title = plot.title
    if plot.setting:
        title += "\n" + textwrap.fill(plot.setting, TITLE_WRAP_CHARS)
    ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            plot.empty_note,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=11,
            color="0.3",
        )
    if notes:
        ax.text(
            0.01,
            0.01,
            "\n".join(notes),
            transform=ax.transAxes,
            va="bottom",
            fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
    for fmt in formats:
        with atomic_path(out_dir / f"{plot.name}.{fmt}") as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=fmt)
    return sorted(s.label for s in series), sum(len(s.x) for s in series)


def _checked(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with its numeric columns as numbers; DataFormatError naming what is wrong."""
    missing = [c for c in REQUIRED_COLUMNS if c not in runs.columns]
    if missing:
        raise DataFormatError(
            f"runs table lacks column(s) {', '.join(missing)}; expected the {SOURCE} "
            "(columns listed in cai.runs_schema.RUN_COLUMNS)"
        )
    runs = runs.copy()
    for column in NUMERIC_COLUMNS:
        try:
            runs[column] = pd.to_numeric(runs[column])
        except (TypeError, ValueError) as err:
            raise DataFormatError(
                f"runs table column {column} is not numeric ({err}); expected the {SOURCE}"
            ) from None
    runs["backend"] = runs["backend"].astype(str)
    return runs


def experiment_figures(
    runs: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("png", "pdf"),
) -> dict[str, list[str]]:
    """Write the experiment's figures and ``figures.json`` into ``out_dir``.

    Args:
        runs: The runs table, one row per run (columns of
            :data:`cai.runs_schema.RUN_COLUMNS`; those in REQUIRED_COLUMNS are used).
        out_dir: Folder of the figures; created if missing.
        formats: File formats (extensions) to write each figure in.

    Returns:
        Figure name -> sorted labels of the series drawn, in FIGURE_NAMES order; the
        same mapping is written to ``out_dir/figures.json``.

    Raises:
        DataFormatError: A required column is missing or not numeric.
        ValueError: A format matplotlib cannot write.
    """
    runs = _checked(runs)
    supported = Figure().canvas.get_supported_filetypes()
    unknown = [f for f in formats if f not in supported]
    if unknown:
        raise ValueError(
            f"figure format(s) {', '.join(unknown)} unknown; one of {', '.join(supported)}"
        )
    out = Path(out_dir)
    lam = runs[runs["kind"] == "lambda"]
    builders = (
        lambda: _time_vs_data_size(runs),
        lambda: _throughput_vs_batch_size(runs),
        lambda: _lambda_time_vs_data_size(lam),
        lambda: _throughput_vs_data_size(lam),
        lambda: _invocations_vs_data_size(runs),
        lambda: _cost_vs_data_size(runs),
        lambda: _extension(runs),
    )
    drawn: dict[str, list[str]] = {}
    for name, build in zip(FIGURE_NAMES, builders, strict=True):
        started = time.perf_counter()
        plot = build()
        labels, points = _draw(plot, out, formats)
        drawn[name] = labels
        _logger.info(
            "figure %s: %d series, %d points, %.2f s -> %s",
            name,
            len(labels),
            points,
            time.perf_counter() - started,
            out / f"{name}.{{{','.join(formats)}}}",
        )
    write_json(out / "figures.json", drawn)
    _logger.info(
        "figures: %d runs, %d figures -> %s",
        len(runs),
        len(drawn),
        out / "figures.json",
    )
    return drawn
