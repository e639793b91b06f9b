"""Figures of a run: predicted against true redshift, and per-partition timing.

Every figure says which weights made the predictions, so a plot of an untrained model
is never mistaken for a result.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from cai.atomic import atomic_path

_logger = logging.getLogger(__name__)

DPI = 120
DENSITY_BINS = 80
TIME_PARTS = ("fetch_s", "model_load_s", "read_s", "compute_s", "write_s")


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")


def plot_redshift_density(
    z_true: np.ndarray,
    z_pred: np.ndarray,
    weights: str,
    metrics: dict[str, float],
    path: str | os.PathLike,
) -> None:
    """2-D histogram of z_pred against z_true (log colour scale) with the y = x line."""
    known = np.isfinite(z_true)
    z_true, z_pred = z_true[known], z_pred[known]
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    low = float(min(z_true.min(), z_pred.min(), 0.0))
    high = float(max(z_true.max(), z_pred.max()))
    edges = np.linspace(low, high, DENSITY_BINS + 1)
    *_, image = ax.hist2d(
        z_true, z_pred, bins=[edges, edges], norm=LogNorm(), cmap="viridis"
    )
    fig.colorbar(image, ax=ax, label="galaxies per bin")
    ax.plot([low, high], [low, high], "r--", lw=1, label="z_pred = z_true")
    ax.set_xlabel("true redshift z_true")
    ax.set_ylabel("predicted redshift z_pred")
    ax.set_title(f"AstroMAE, {weights}\n{len(z_true):,} galaxies")
    ax.text(
        0.03,
        0.97,
        f"NMAD {metrics['nmad']:.4f}\noutliers {metrics['outlier_fraction']:.1%}\n"
        f"bias {metrics['bias']:+.4f}",
        transform=ax.transAxes,
        va="top",
        fontsize=9,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_partition_times(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Stacked bars of each partition's seconds: fetch, model load, read, compute, write."""
    fig = Figure(figsize=(max(5.0, 0.35 * len(table) + 2), 4))
    ax = fig.subplots()
    bottom = np.zeros(len(table))
    for part in TIME_PARTS:
        values = table[part].to_numpy()
        ax.bar(table["partition"], values, bottom=bottom, label=part.removesuffix("_s"))
        bottom += values
    ax.set_xlabel("partition")
    ax.set_ylabel("seconds")
    ax.set_title(
        f"Time per partition ({table['backend'].iloc[0]}, batch {table['batch_size'].iloc[0]})"
    )
    ax.set_ylim(top=1.2 * bottom.max())  # room for the legend above the bars
    ax.legend(fontsize=8, ncols=len(TIME_PARTS), loc="upper center")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    _save(fig, path)


def plot_partition_throughput(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Each partition's samples/s over its inference time, with the mean."""
    fig = Figure(figsize=(max(5.0, 0.35 * len(table) + 2), 4))
    ax = fig.subplots()
    rate = table["samples_per_s"].to_numpy()
    ax.bar(table["partition"], rate, color="tab:green")
    ax.axhline(rate.mean(), color="k", ls="--", lw=1, label=f"mean {rate.mean():.1f}/s")
    ax.set_xlabel("partition")
    ax.set_ylabel("galaxies per second (read + compute)")
    ax.set_title(
        f"Throughput per partition ({table['backend'].iloc[0]}, {table['device'].iloc[0]})"
    )
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    _save(fig, path)


def plot_catalogue(
    catalogue: str | os.PathLike,
    summary: str | os.PathLike,
    out: str | os.PathLike,
    split: str | os.PathLike | None = None,
) -> None:
    """The redshift density plot of a run's catalogue, titled with its weights (with
    a split: of its test galaxies only, as the accuracy table counts them)."""
    from cai.aggregate import predictions_label, read_summary
    from cai.metrics import evaluation_set, redshift_metrics

    galaxies, evaluated_on = evaluation_set(catalogue, split)
    z_pred = galaxies["z_pred"].to_numpy()
    z_true = galaxies["z_true"].to_numpy()
    weights = predictions_label(read_summary(summary))
    label = weights if split is None else f"{weights}\n{evaluated_on}"
    plot_redshift_density(z_true, z_pred, label, redshift_metrics(z_pred, z_true), out)
    _logger.info(
        "plot: %d galaxies (%s), %s -> %s", len(z_pred), evaluated_on, weights, out
    )


def plot_training(record_path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Learning curves of a fine-tuning: training and validation loss, and the
    validation NMAD with the epoch kept, per epoch."""
    from cai.finetune import read_record

    record = read_record(record_path)
    history = pd.DataFrame(record["history"])
    trained = history[history["epoch"] >= 1]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, nmad_ax = fig.subplots(1, 2)
    loss_ax.plot(trained["epoch"], trained["train_loss"], "o-", ms=3, label="train")
    loss_ax.plot(
        history["epoch"], history["validation_loss"], "s-", ms=3, label="validation"
    )
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("epoch (0: before training)")
    loss_ax.set_ylabel("MSE of z")
    loss_ax.legend(fontsize=8)
    nmad_ax.plot(history["epoch"], history["validation_nmad"], "s-", ms=3, color="C1")
    best = record["best_epoch"]
    nmad_ax.axvline(best, color="k", ls="--", lw=1, label=f"kept: epoch {best}")
    nmad_ax.set_xlabel("epoch (0: before training)")
    nmad_ax.set_ylabel("validation NMAD")
    nmad_ax.legend(fontsize=8)
    counts = record["data"]["split"]["counts"]
    fig.suptitle(
        f"Fine-tuning: {record['weights']}\n{counts['train']:,} train, "
        f"{counts['validation']:,} validation galaxies; stopped: {record['stopped']}",
        fontsize=9,
    )
    _save(fig, out)
    _logger.info(
        "plot: %d epochs of fine-tuning (best %d) -> %s", len(trained), best, out
    )


def plot_partition_table(
    table: str | os.PathLike,
    times_out: str | os.PathLike,
    throughput_out: str | os.PathLike,
) -> None:
    """Both per-partition figures from a partition metrics TSV."""
    frame = pd.read_csv(table, sep="\t", dtype={"partition": str})
    plot_partition_times(frame, times_out)
    plot_partition_throughput(frame, throughput_out)
    _logger.info("plot: %d partitions -> %s, %s", len(frame), times_out, throughput_out)
